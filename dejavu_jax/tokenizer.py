"""Tokenizers come from transformers; this module only finds one for a model directory."""

from __future__ import annotations

from pathlib import Path

from dejavu_jax.hf_checkpoint import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(directory, required: bool = True):
    """The directory's tokenizer. Bare `vocab.json` + `merges.txt` get OPT's settings (BOS `</s>` prepended)."""
    directory = Path(directory)
    if not any((directory / name).exists() for name in _TOKENIZER_FILES):
        if required:
            raise CheckpointError(f"no tokenizer files in {directory} (expected one of {_TOKENIZER_FILES})")
        return None
    from transformers import AutoTokenizer, GPT2Tokenizer

    if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    else:
        tokenizer = GPT2Tokenizer(
            str(directory / "vocab.json"),
            str(directory / "merges.txt"),
            bos_token="</s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
        )
    tokenizer.padding_side = "left"
    return tokenizer
