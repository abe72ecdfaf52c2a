"""`python -m bench train-stream` on the CPU with the tiny shape: the random model loads, the run's numbers land in
the report, and the streaming run leaves no activations."""

import json
import lzma

from bench.train_stream import main, random_model
from conftest import OPT_TOKENIZER, SHARED


def test_tiny_shape_smoke(tmp_path, monkeypatch):
    from dejavu_jax.checkpoint import load_model

    corpus = tmp_path / "docs.jsonl"
    with lzma.open(SHARED / "data" / "wiki2015" / "validation.jsonl.xz", "rt") as f:
        corpus.write_text("".join(line for _, line in zip(range(10), f)))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the child process too
    work, out = tmp_path / "work", tmp_path / "result.md"
    argv = ["--shape", "tiny", "--data", str(corpus), "--tokenizer", str(OPT_TOKENIZER), "--ranks", "8"]
    # Two epochs: the whole epoch is one pool of forward batches, and the rate clock starts after the first.
    argv += ["--max-tokens", "640", "--seq-len", "32", "--batch-size", "4", "--epochs", "2"]
    assert main(argv + ["--workdir", str(work), "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    (run,) = data["runs"]
    assert run["rank"] == 8 and run["training_tokens"] == 576 and run["tokens_per_s"] > 0
    assert run["work_dir_bytes"] > 0 and run["disk_mode_activation_bytes"] > 0
    assert not any(p.name == "activations" for p in work.rglob("*"))
    assert run["layer_groups"] >= 1 and run["estimated_peak_disk_bytes"] <= run["disk_budget_bytes"]
    assert 0 < run["peak_work_dir_bytes"] <= run["estimated_peak_disk_bytes"]
    table_row = next(line for line in out.read_text().splitlines() if line.startswith("| 8 |"))
    if run["peak_device_bytes"] is None:  # the CPU backend keeps no memory statistics
        assert "| n/a |" in table_row
    # The random model is a converted model directory whose tokenizer covers the vocabulary.
    model = load_model(work / "model-tiny", "float32")
    assert model.config.vocab_size >= len(model.tokenizer) and model.config.hidden_size == 64
    assert random_model("tiny", OPT_TOKENIZER, work / "model-tiny")[0] == work / "model-tiny"  # reused
