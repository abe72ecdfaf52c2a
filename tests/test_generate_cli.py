"""`python -m dejavu_jax.generate`: how the sampling flags combine, and which bad flags fail before the model loads.

The model and the generation are stubbed: these tests are about the command line, not the decoding (tested in
test_generate.py)."""

import types

import jax.numpy as jnp
import pytest

import dejavu_jax.checkpoint
import dejavu_jax.generation
from dejavu_jax.generate import build_parser
from dejavu_jax.generate import main as generate_main
from dejavu_jax.sampling import SamplingConfig

VOCAB = 100


@pytest.fixture
def calls(monkeypatch):
    """Stub load_model (a model of VOCAB tokens) and generate_text (records its arguments); returns the records."""
    record = {"loaded": 0, "generated": []}

    def load_model(path, dtype, tp=1):
        record["loaded"] += 1
        params = {"embed_tokens": {"embedding": jnp.zeros((VOCAB, 2), jnp.float32)}}
        return types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=VOCAB), params=params)

    def generate_text(model, prompts, max_new_tokens, sampling, seed, *rest):
        record["generated"].append({"sampling": sampling, "seed": seed, "max_new_tokens": max_new_tokens})
        return [{"prompt": p, "text": " out", "token_ids": [5]} for p in prompts]

    monkeypatch.setattr(dejavu_jax.checkpoint, "load_model", load_model)
    monkeypatch.setattr(dejavu_jax.generation, "generate_text", generate_text)
    return record


def _run(*flags):
    return generate_main(["--model", "stub", "--prompt", "hi", "--json", *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "5"], "--top-k only applies when sampling; add --temperature T"),
        (["--top-p", "0.9"], "--top-p only applies when sampling"),
        (["--seed", "3"], "--seed only applies when sampling"),
        (["--top-k", "5", "--seed", "3", "--temperature", "0"], "--top-k, --seed only apply when sampling"),
        (["--greedy", "--top-p", "0.5"], "--top-p only applies when sampling"),
        (["--greedy", "--temperature", "0.7"], "--greedy contradicts --temperature 0.7"),
        (["--temperature", "inf"], "--temperature must be >= 0 and finite"),
        (["--temperature", "nan"], "--temperature must be >= 0 and finite"),
        (["--temperature", "-1"], "--temperature must be >= 0 and finite"),
        (["--temperature", "1", "--top-p", "0"], r"top_p must be in (0, 1]"),
        (["--temperature", "1", "--top-k", "-1"], "top_k must be an int >= 0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be a positive int"),
        (["--max-new-tokens", "-4"], "max_new_tokens must be a positive int"),
    ],
)
def test_bad_flags_fail_before_loading(calls, capsys, flags, message):
    assert _run(*flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert calls["loaded"] == 0 and not calls["generated"]


def test_top_k_above_the_vocabulary_fails_once_the_model_is_known(calls, capsys):
    assert _run("--temperature", "1", "--top-k", str(VOCAB + 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"top_k {VOCAB + 1} exceeds the vocabulary of {VOCAB} tokens" in err
    assert calls["loaded"] == 1 and not calls["generated"]
    assert _run("--temperature", "1", "--top-k", str(VOCAB)) == 0  # the whole vocabulary is allowed
    assert calls["generated"][-1]["sampling"].top_k == VOCAB


@pytest.mark.parametrize(
    "flags, sampling, seed",
    [
        ([], SamplingConfig(greedy=True, temperature=0.0, top_k=0, top_p=1.0), 0),
        (["--greedy"], SamplingConfig(greedy=True, temperature=0.0, top_k=0, top_p=1.0), 0),
        (["--greedy", "--temperature", "0"], SamplingConfig(greedy=True, temperature=0.0, top_k=0, top_p=1.0), 0),
        (["--temperature", "0.7"], SamplingConfig(greedy=False, temperature=0.7, top_k=0, top_p=1.0), 0),
        (
            ["--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"],
            SamplingConfig(greedy=False, temperature=0.7, top_k=5, top_p=0.9),
            3,
        ),
    ],
)
def test_good_flags_reach_generation_as_given(calls, capsys, flags, sampling, seed):
    assert _run("--max-new-tokens", "7", *flags) == 0
    assert calls["generated"] == [{"sampling": sampling, "seed": seed, "max_new_tokens": 7}]


def test_help_documents_the_sampling_rules():
    text = " ".join(build_parser().format_help().split())
    assert "only apply when sampling: without --temperature > 0 they are an error" in text
    assert "an error together with --temperature > 0" in text
    assert "at most the vocabulary size" in text


def test_sampling_config_rejects_infinite_temperature_and_checks_the_vocabulary():
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
        SamplingConfig(greedy=False, temperature=float("inf"))
    config = SamplingConfig(greedy=False, temperature=1.0, top_k=50)
    config.check_vocab(50)
    with pytest.raises(ValueError, match="top_k 50 exceeds the vocabulary of 49 tokens"):
        config.check_vocab(49)
