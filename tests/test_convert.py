"""HF checkpoint -> orbax model directory -> model, and every way a user can get the conversion wrong."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import OPT_TOKENIZER, random_hf_model, rel_max_err, tiny_hf_config
from dejavu_jax.checkpoint import convert_to_directory, load_model
from dejavu_jax.config import ConfigError
from dejavu_jax.convert import main as convert_main
from dejavu_jax.hf_checkpoint import CheckpointError
from dejavu_jax.model import OPTForCausalLM


def hf_and_jax_logits(hf, model_dir, dtype="float32"):
    ids = np.random.default_rng(0).integers(3, hf.config.vocab_size, size=(2, 10))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    loaded = load_model(model_dir, dtype)
    out, _ = OPTForCausalLM(loaded.config).apply({"params": loaded.params}, jnp.asarray(ids))
    return np.asarray(out), ref


def save_as_torch_bin(hf_dir):
    """transformers 5 writes only safetensors; older OPT checkpoints on the hub are pytorch_model.bin."""
    from safetensors.torch import load_file

    torch.save(load_file(hf_dir / "model.safetensors"), hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "torch_bin"])
def test_hf_to_orbax_reproduces_logits(layout, save_hf, tmp_path):
    hf = random_hf_model(tiny_hf_config(do_layer_norm_before=False, word_embed_proj_dim=24))
    hf_dir = save_hf(hf, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    if layout == "torch_bin":
        save_as_torch_bin(hf_dir)
    elif layout == "sharded":
        assert (hf_dir / "model.safetensors.index.json").exists()
    out_dir = tmp_path / "converted"
    assert convert_main(["--hf", str(hf_dir), "--out", str(out_dir), "--dtype", "float32"]) == 0
    assert (out_dir / "dejavu_jax.json").exists() and (out_dir / "params").is_dir()
    out, ref = hf_and_jax_logits(hf, out_dir)
    assert rel_max_err(out, ref) <= 1e-4
    # The HF directory itself loads too (converted in memory).
    out_mem, _ = hf_and_jax_logits(hf, hf_dir)
    np.testing.assert_array_equal(out_mem, out)


def test_keys_without_model_prefix(save_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = random_hf_model(tiny_hf_config())
    hf_dir = save_hf(hf)
    tensors = load_file(hf_dir / "model.safetensors")
    assert all(k.startswith("model.") for k in tensors if k != "lm_head.weight")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, hf_dir / "model.safetensors")
    out, ref = hf_and_jax_logits(hf, hf_dir)
    assert rel_max_err(out, ref) <= 1e-4


def test_random_opt_with_real_tokenizer(save_hf, tmp_path):
    from transformers import GPT2Tokenizer

    hf = random_hf_model(tiny_hf_config(vocab_size=50272, hidden_size=16, num_attention_heads=2, ffn_dim=32))
    hf_dir = save_hf(hf)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(OPT_TOKENIZER / name, hf_dir / name)
    # As the hub ships OPT: the tokenizer files plus a tokenizer_config.json naming BOS </s>.
    GPT2Tokenizer(
        str(hf_dir / "vocab.json"),
        str(hf_dir / "merges.txt"),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    ).save_pretrained(hf_dir)
    out_dir = tmp_path / "converted"
    convert_to_directory(hf_dir, out_dir, dtype="float16")
    loaded = load_model(out_dir, "float16")
    assert loaded.params["embed_tokens"]["embedding"].dtype == jnp.float16
    assert loaded.tokenizer("Hello world")["input_ids"] == [2, 31414, 232]
    assert loaded.tokenizer("Hey, are you conscious? Can you talk to me?")["input_ids"] == [
        2,
        13368,
        6,
        32,
        47,
        13316,
        116,
        2615,
        47,
        1067,
        7,
        162,
        116,
    ]


def test_bare_vocab_and_merges_get_opt_settings(tmp_path):
    from dejavu_jax.tokenizer import load_tokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(OPT_TOKENIZER / name, tmp_path / name)
    assert load_tokenizer(tmp_path)("Hello world")["input_ids"] == [2, 31414, 232]


# ---- bad input: one clear error, nothing half-written --------------------------------------------------------


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_directory_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    assert convert_main(["--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no Hugging Face checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "does-not-exist")


def test_non_opt_config(save_hf, tmp_path):
    hf_dir = save_hf(random_hf_model(tiny_hf_config()))
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'opt'.*'llama'"):
        convert_to_directory(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(save_hf, tmp_path, capsys):
    hf_dir = save_hf(random_hf_model(tiny_hf_config()))
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert convert_main(["--hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_out_needs_force(save_hf, tmp_path, capsys):
    hf_dir = save_hf(random_hf_model(tiny_hf_config()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert convert_main(["--hf", str(hf_dir), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert convert_main(["--hf", str(hf_dir), "--out", str(out), "--force"]) == 0
    assert (out / "dejavu_jax.json").exists() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []


def test_missing_unmapped_and_misshapen_tensors(save_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_dir = save_hf(random_hf_model(tiny_hf_config()))
    original = load_file(hf_dir / "model.safetensors")

    def rewrite(tensors):
        save_file(tensors, hf_dir / "model.safetensors")

    rewrite({k: v for k, v in original.items() if k != "model.decoder.layers.1.fc2.bias"})
    with pytest.raises(CheckpointError, match="layers.1.fc2.bias.*missing"):
        load_model(hf_dir)
    rewrite({**original, "model.decoder.layers.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="map to nothing.*extra"):
        load_model(hf_dir)
    rewrite({**original, "model.decoder.layers.0.fc1.weight": np.zeros((5, 32), np.float32)})
    with pytest.raises(CheckpointError, match="fc1_w.*shape"):
        load_model(hf_dir)
    shard = dict(original)
    rewrite(shard)
    save_file(
        {"model.decoder.layers.0.fc1.bias": original["model.decoder.layers.0.fc1.bias"]},
        hf_dir / "model-extra.safetensors",
    )
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    **{k: "model.safetensors" for k in original},
                    "model.decoder.layers.0.fc1.bias": "model-extra.safetensors",
                }
            }
        )
    )
    with pytest.raises(CheckpointError, match="appears twice"):
        load_model(hf_dir)


def test_bad_dtype(save_hf, tmp_path):
    hf_dir = save_hf(random_hf_model(tiny_hf_config()))
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_to_directory(hf_dir, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not fetch 'facebook/opt-125m'.*pass its directory"):
        load_model("facebook/opt-125m")
