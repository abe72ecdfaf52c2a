"""`python -m bench generate` on the tiny shape (CPU, interpret mode): its rows, the tuning flags and bad input."""

import json

import pytest

from bench.generate import main, parse_tuning


@pytest.mark.parametrize("threads", [1, 3])
def test_rows_of_a_tiny_sparse_run(threads, tmp_path, monkeypatch):
    """The same rows, refusals and table whether the rows compile one after another or on threads."""
    import bench.generate

    def refused(config, batch, prompt_len, new_tokens, params, policy, *args, **kwargs):
        if policy.tuning.hidden_block_r == 2:  # stands in for a setting the compiler refuses
            raise RuntimeError("INTERNAL: refused\nsecond line")
        return prepare(config, batch, prompt_len, new_tokens, params, policy, *args, **kwargs)

    prepare = bench.generate.prepare_jax
    monkeypatch.setattr(bench.generate, "prepare_jax", refused)
    out = tmp_path / "g.md"
    argv = "--shape tiny --no-hf --attention xla --repeats 1 --new-tokens 3 --prompt-len 8 --mlp-density 0.25 "
    argv += "--fire-rate 0.1 --predictor-rank 16 --selection threshold --variants fixed "
    argv += "--tuned-variants predicted --tuning hidden=xla,fc1_segment=16 --tuning hidden_block_r=2 --int8-scores"
    argv += f" --compile-threads {threads}"
    assert main(argv.split() + ["--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    rows = results["rows"]
    # the refused setting's two rows are listed, not timed; the others go on
    assert [label for label, _ in results["not_timed"]] == [
        "tiny b1 [xla] predicted, threshold [hidden_block_r=2]",
        "tiny b1 [xla] predicted, threshold, int8 scores [hidden_block_r=2]",
    ]
    assert "- tiny b1 [xla] predicted, threshold [hidden_block_r=2]: RuntimeError: INTERNAL: refused" in (
        out.read_text().splitlines()
    )
    assert [r["variant"] for r in rows] == [
        "dense",
        "fixed rows",
        "predicted, threshold [hidden=xla,fc1_segment=16]",
        "predicted, threshold, int8 scores [hidden=xla,fc1_segment=16]",
    ]
    assert rows[2]["tuning"] == "hidden=xla,fc1_segment=16" and rows[2]["rank"] == 16
    for r in rows:
        assert r["jax"]["compile_s"] > 0 and r["jax"]["total_ms"] > 0
    assert "| tiny | 1 | replicated | - | 1 | xla | fixed rows |" in out.read_text()


def test_compile_rows_keeps_order_and_errors_and_compiles_the_first_alone():
    import threading
    import time

    from bench.generate import compile_rows

    events, lock = [], threading.Lock()

    def compile_one(item):
        with lock:
            events.append(("start", item))
        time.sleep(0.05)
        with lock:
            events.append(("end", item))
        if item == 3:
            raise RuntimeError("refused")
        return item * 10

    for threads in (1, 4):
        events.clear()
        out = compile_rows(compile_one, [0, 1, 2, 3, 4], threads)
        assert out[:3] == [0, 10, 20] and isinstance(out[3], RuntimeError) and out[4] == 40
        assert events[:2] == [("start", 0), ("end", 0)]  # the first (dense) row compiles alone
    starts = [i for i, (kind, _) in enumerate(events) if kind == "start"]
    ends = [i for i, (kind, _) in enumerate(events) if kind == "end"]
    assert starts[2] < ends[1]  # on 4 threads, the others overlap
    # an item that may not fail ends the call: one after another, no later item starts
    events.clear()
    with pytest.raises(RuntimeError, match="refused"):
        compile_rows(compile_one, [0, 3, 4], 1, may_fail=lambda item: item != 3)
    assert ("start", 4) not in events


def test_parse_tuning_and_bad_flags(capsys):
    assert parse_tuning("fc1_segment=128, hidden=xla") == (("fc1_segment", 128), ("hidden", "xla"))
    for spec in ("fc1_segment", "hidden=cuda", "fc9=1"):
        with pytest.raises(ValueError):
            parse_tuning(spec)
    for argv in (
        ["--variants", "fixed,sometimes"],
        ["--tuning", "scores=gpu"],
        ["--variants", "fixed", "--int8-scores"],
        ["--head-union"],
        ["--head-threshold"],
        ["--compile-threads", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            main(["--shape", "tiny", "--mlp-density", "0.1", *argv])
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_head_rows_skip_heads_only_rows_that_repeat_another_row():
    from bench.generate import head_variants
    from dejavu_jax.config import shape_config
    from dejavu_jax.sparsity import SparseWeights

    tunings = [((), ["fixed"]), ((("fc1_segment", 16),), ["fixed"]), ((("head_kv", "repair"),), ["fixed"])]
    rows = head_variants(shape_config("tiny"), 0.5, tunings, [], [], SparseWeights(), {})
    assert [label for label, *_ in rows] == [
        "fixed heads",
        "fixed rows + fixed heads",
        "fixed rows + fixed heads [fc1_segment=16]",  # its heads-only row would be the untuned one's program
        "fixed rows + fixed heads [head_kv=repair]",  # beside MLP rows a tuning gets no heads-only twin
    ]
    alone = head_variants(shape_config("tiny"), 0.5, tunings, [], [], None, {})  # no MLP rows
    assert [label for label, *_ in alone] == ["fixed heads", "fixed heads [head_kv=repair]"]
    twins = head_variants(shape_config("tiny"), 0.5, tunings[:1], [], [], SparseWeights(), {}, union=True)
    assert [(label, policy.head_union) for label, policy, *_ in twins] == [
        ("fixed heads", False),
        ("fixed heads (batch union)", True),
        ("fixed rows + fixed heads", False),
        ("fixed rows + fixed heads (batch union)", True),
    ]


def test_mlp_rows_carry_only_mlp_settings_and_skip_repeated_programs():
    """A tuned MLP-only row drops the tuning's head settings; a tuning whose MLP settings an earlier one had (a
    heads-only tuning: the untuned row's) adds no MLP row."""
    from bench.generate import mlp_variants
    from dejavu_jax.sparsity import MLPSparsity, Selection, SparseWeights

    fixed, predicted = SparseWeights(), {16: SparseWeights()}
    both = ["fixed", "lossless", "predicted"]
    tunings = [
        ((), both),
        ((("head_out_residual", 1), ("fc2_residual", 1)), both),
        ((("head_out_residual", 1), ("head_out_layernorm", 1), ("fc2_residual", 1)), both),  # MLP part repeats
        ((("head_kv", "all"),), both),  # heads only: the untuned programs
    ]
    rows = mlp_variants(tunings, [16], [Selection.THRESHOLD], fixed, predicted, {})
    assert [label for label, *_ in rows] == [
        "fixed rows",
        "lossless",
        "predicted, threshold",
        "fixed rows [fc2_residual=1]",
        "lossless [fc2_residual=1]",
        "predicted, threshold [fc2_residual=1]",
    ]
    tuned = [policy for label, policy, *_ in rows if "fc2_residual" in label]
    assert all(dict(policy.tuning.knobs)["fc2_residual"] == 1 for policy in tuned)
    assert [policy.mlp for policy in tuned] == [MLPSparsity.NONE, MLPSparsity.LOSSLESS, MLPSparsity.PREDICTED]
    assert rows[-1][3] == {"rank": 16, "tuning": "fc2_residual=1"}


def test_threshold_head_rows_keep_about_the_density_of_heads():
    """`--head-threshold`: the threshold-selection predicted row gets a twin whose random head predictors carry a
    threshold that keeps about `density` of the heads a token (bounded by every head), so the count varies."""
    import dataclasses

    import jax
    import numpy as np

    from bench.generate import head_threshold_for, head_variants, random_head_predictors
    from dejavu_jax.config import shape_config
    from dejavu_jax.sparsity import MLPSparsity, Selection, SparseWeights, head_rows

    config = shape_config("tiny")
    n = config.num_attention_heads
    rows = head_variants(
        config, 0.5, [((), ["predicted"])], [16], [Selection.THRESHOLD], None, {16: SparseWeights()}, False, True
    )
    assert [label for label, *_ in rows] == [
        "predicted, threshold + predicted heads",
        "predicted, threshold + predicted heads by threshold",
    ]
    (_, top_k, *_), (_, by_threshold, weights, extra) = rows
    assert top_k.head_k == n // 2 and by_threshold.head_k == n and extra["heads_kept"].startswith(f"~{n // 2}/{n}")
    x = jax.random.normal(jax.random.PRNGKey(0), (2000, 1, config.hidden_size))
    heads_alone = dataclasses.replace(by_threshold, mlp=MLPSparsity.NONE)  # the MLP predictors are not needed here
    kept = np.asarray(head_rows(heads_alone, weights, 1, x, n).mask).sum(-1)
    assert abs(kept.mean() / n - 0.5) < 0.05 and len(np.unique(kept)) > 2
    assert head_threshold_for(0.5) == 0.0 and head_threshold_for(1.0) == float("-inf")
    assert abs(head_threshold_for(0.25) - 0.6745) < 1e-3
    assert not random_head_predictors(config, 16)[0].calibrated_threshold  # top-K heads, as before
