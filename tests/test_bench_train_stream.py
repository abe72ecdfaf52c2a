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


def _tiny_argv(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    with lzma.open(SHARED / "data" / "wiki2015" / "validation.jsonl.xz", "rt") as f:
        corpus.write_text("".join(line for _, line in zip(range(10), f)))
    argv = ["--shape", "tiny", "--data", str(corpus), "--tokenizer", str(OPT_TOKENIZER), "--ranks", "8"]
    return argv + ["--max-tokens", "640", "--seq-len", "32", "--batch-size", "4", "--epochs", "2"]


def test_a_failed_run_is_written_with_its_last_log_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    out = tmp_path / "result.md"
    argv = _tiny_argv(tmp_path) + ["--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert main(argv + ["--stream-disk-budget-gb", "1e-9"]) == 1  # train refuses a budget nothing fits
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert run["status"] == "failed (exit 2)" and run["rank"] == "8"
    assert any(line.startswith("error: stream mode needs at least") for line in run["last_log"])
    assert "Rank 8: **failed (exit 2)**" in out.read_text()


def test_sigterm_stops_the_child_and_writes_how_far_it_got(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "result.md"
    argv = _tiny_argv(tmp_path) + ["--workdir", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "train-stream", *argv], stdout=subprocess.PIPE, text=True, env=env
    )
    for line in bench.stdout:  # the child starts right after the bench prints its command line
        if line.startswith("$ "):
            break
    time.sleep(3)  # the child is importing JAX or training
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 124
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert run["status"] == "stopped (SIGTERM)" and run["wall_s"] >= 3
    assert "Rank 8: **stopped (SIGTERM)**" in out.read_text()
