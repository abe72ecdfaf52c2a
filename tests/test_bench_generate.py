"""`python -m bench generate` on the tiny shape (CPU, interpret mode): its rows, the tuning flags and bad input."""

import json

import pytest

from bench.generate import main, parse_tuning


def test_rows_of_a_tiny_sparse_run(tmp_path):
    out = tmp_path / "g.md"
    argv = "--shape tiny --no-hf --attention xla --repeats 1 --new-tokens 3 --prompt-len 8 --mlp-density 0.25 "
    argv += "--fire-rate 0.1 --predictor-rank 16 --selection threshold --variants fixed "
    argv += "--tuned-variants predicted --tuning hidden=xla,fc1_segment=16"
    assert main(argv.split() + ["--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "dense",
        "fixed rows",
        "predicted, threshold [hidden=xla,fc1_segment=16]",
    ]
    assert rows[2]["tuning"] == "hidden=xla,fc1_segment=16" and rows[2]["rank"] == 16
    for r in rows:
        assert r["jax"]["compile_s"] > 0 and r["jax"]["total_ms"] > 0
    assert "| tiny | 1 | replicated | 1 | xla | fixed rows |" in out.read_text()


def test_parse_tuning_and_bad_flags(capsys):
    assert parse_tuning("fc1_segment=128, hidden=xla") == (("fc1_segment", 128), ("hidden", "xla"))
    for spec in ("fc1_segment", "hidden=cuda", "fc9=1"):
        with pytest.raises(ValueError):
            parse_tuning(spec)
    for argv in (["--variants", "fixed,sometimes"], ["--tuning", "scores=gpu"]):
        with pytest.raises(SystemExit) as e:
            main(["--shape", "tiny", "--mlp-density", "0.1", *argv])
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
