"""Compiled generation: HF parity, no recompiles, sampling, the CLI and its errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dejavu_jax.checkpoint import load_model
from dejavu_jax.generate import main as generate_main
from dejavu_jax.generation import generate_ids, generate_tokens, generation_program
from dejavu_jax.sampling import SamplingConfig, SamplingParams, sample_tokens

PROMPTS = [
    "The history of",
    "In 1905, the physicist Albert Einstein published a paper on",
    "Paris is the capital and largest city",
]


@pytest.fixture(scope="module")
def reference(reference_model_dir):
    return load_model(reference_model_dir, "float32")


def test_greedy_matches_hf_generate_on_a_padded_batch(reference, reference_model_dir):
    from transformers import OPTForCausalLM as HF

    hf = HF.from_pretrained(reference_model_dir, dtype=torch.float32).eval()
    tok = reference.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == 3  # really different lengths
    with torch.no_grad():
        expected = hf.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=1)
    expected = expected[:, batch["input_ids"].shape[1] :].tolist()
    ours = generate_ids(reference.params, reference.config, [tok(p)["input_ids"] for p in PROMPTS], 24)
    for got, want in zip(ours, expected):
        assert got == want[: len(got)] and len(got) > 0


def test_pallas_attention_generates_the_same_tokens(reference):
    """The fused Pallas decode attention (interpret mode here) and the XLA path pick the same greedy tokens."""
    prompts = [reference.tokenizer(p)["input_ids"] for p in PROMPTS]
    xla = generate_ids(reference.params, reference.config, prompts, 8)
    pallas = generate_ids(reference.params, reference.config, prompts, 8, attention_impl="pallas")
    assert pallas == xla


def test_exhaustive_autotune_generates_the_same_tokens(reference, tmp_path, monkeypatch):
    """The exhaustive-autotuning program (its XLA options accepted, a no-op on the CPU) decodes the same tokens;
    a mode that does not exist is an error."""
    monkeypatch.setenv("DEJAVU_XLA_AUTOTUNE_CACHE", str(tmp_path / "autotune"))
    generation_program.cache_clear()
    prompts = [reference.tokenizer(p)["input_ids"] for p in PROMPTS]
    tuned = generate_ids(reference.params, reference.config, prompts, 6, autotune="exhaustive")
    assert tuned == generate_ids(reference.params, reference.config, prompts, 6)
    assert (tmp_path / "autotune").is_dir()
    generation_program.cache_clear()
    with pytest.raises(ValueError, match="autotune must be one of"):
        generate_ids(reference.params, reference.config, prompts, 6, autotune="fast")


def test_max_new_tokens_and_sampling_do_not_recompile(reference):
    prompts = [reference.tokenizer(p)["input_ids"] for p in PROMPTS]
    generate_ids(reference.params, reference.config, prompts, 20)
    before = generate_tokens._cache_size()
    short = generate_ids(reference.params, reference.config, prompts, 17)
    generate_ids(reference.params, reference.config, prompts, 30, SamplingConfig(False, 0.8, 5, 0.9), seed=3)
    assert generate_tokens._cache_size() == before
    assert all(len(s) <= 17 for s in short)


def test_eos_stops_each_sequence(reference):
    """Declare as EOS a token that sequence 0 emits at step 3 and sequence 1 never emits: only 0 stops there."""
    prompts = [reference.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    free = generate_ids(reference.params, reference.config, prompts, 12)
    stop_token = free[0][3]
    assert stop_token not in free[0][:3] and stop_token not in free[1], "pick other prompts"
    config = dataclasses.replace(reference.config, eos_token_id=stop_token)
    stopped = generate_ids(reference.params, config, prompts, 12)
    assert stopped[0] == free[0][:4]
    assert stopped[1] == free[1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(reference):
    prompts = [reference.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    cfg = SamplingConfig(greedy=False, temperature=1.0)
    a = generate_ids(reference.params, reference.config, prompts, 12, cfg, seed=7)
    b = generate_ids(reference.params, reference.config, prompts, 12, cfg, seed=7)
    c = generate_ids(reference.params, reference.config, prompts, 12, cfg, seed=8)
    assert a == b and a != c
    greedy = generate_ids(reference.params, reference.config, prompts, 12)
    top1 = generate_ids(reference.params, reference.config, prompts, 12, SamplingConfig(False, 1.5, top_k=1), seed=9)
    assert top1 == greedy


def test_sample_tokens_respects_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000, jnp.float32))
    keys = jax.random.PRNGKey(0)

    def draw(top_k, top_p):
        return np.asarray(
            sample_tokens(logits, keys, SamplingParams(jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p)))
        )

    assert set(draw(2, 1.0)) == {0, 1}
    assert set(draw(0, 0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(0, 0.5)) == {0}
    counts = np.bincount(draw(0, 1.0), minlength=4) / 2000
    assert np.abs(counts - [0.5, 0.3, 0.15, 0.05]).max() < 0.05


def test_cli_json(reference_model_dir, capsys):
    code = generate_main(
        [
            "--model",
            str(reference_model_dir),
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[2],
            "--max-new-tokens",
            "5",
            "--dtype",
            "float32",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == [PROMPTS[0], PROMPTS[2]]
    for r in lines:
        assert len(r["token_ids"]) == 5 and isinstance(r["text"], str) and r["text"]
        assert not r["text"].startswith(r["prompt"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "word " * 1100], "more than the model's 1024 positions"),
        (["--prompt", "word " * 1000, "--max-new-tokens", "100"], "runs past the model's 1024 positions"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive int"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "hi", "--temperature", "1", "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["--prompt", "hi", "--temperature", "1", "--top-k", "-2"], "top_k must be an int >= 0"),
    ],
)
def test_cli_bad_input(reference_model_dir, capsys, argv, message):
    import re

    assert generate_main(["--model", str(reference_model_dir)] + argv) == 2
    assert re.search(message, capsys.readouterr().err)
