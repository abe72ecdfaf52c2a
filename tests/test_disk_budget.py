"""Stream mode's disk budget: the layer grouping chosen from it (against sizes worked out here from the formula's
inputs), a budget no grouping meets, and a real run that stays under the budget it was given."""

import contextlib
import dataclasses
import io
import json
import lzma
import os

import pytest

from conftest import SHARED
from dejavu_jax.config import shape_config

# 4 layers, d 8, ffn 32, 2 heads, rank 4.
CONFIG = dataclasses.replace(
    shape_config("tiny"), num_hidden_layers=4, hidden_size=8, ffn_dim=32, num_attention_heads=2
)
RANK = 4
MLP_PARAMS = 8 * 4 + 4 + 4 * 32 + 32  # d·r + r + r·ffn + ffn
HEAD_PARAMS = 8 * 4 + 4 + 4 * 2 + 2  # d·r + r + r·heads + heads
FP16 = 2 * (MLP_PARAMS + HEAD_PARAMS)  # a layer's finished predictors
STATE = 3 * 4 * (MLP_PARAMS + HEAD_PARAMS)  # a layer's float32 predictors and two Adam moments
FINAL = 3 * 4 * FP16  # group files, the predictors directory and calibration's new copy of it
REPORT = 2 * 10**6 + 2 * 4 * (32 + 1) * 12  # fixed part, and two copies of 4 layers' recall curves (ffn + 1 points)
# Peak of each group count: max over groups of (finished layers' fp16 + two copies of the group's state), and the
# end. The groups are contiguous and as even as possible: 1 -> [4], 2 -> [2, 2], 3 -> [1, 2, 1], 4 -> [1, 1, 1, 1].
TRAINING = {
    1: 2 * 4 * STATE,
    2: max(2 * 2 * STATE, 2 * FP16 + 2 * 2 * STATE),
    3: max(2 * STATE, 1 * FP16 + 2 * 2 * STATE, 3 * FP16 + 2 * STATE),
    4: 3 * FP16 + 2 * STATE,
}


def test_estimates_and_the_grouping_chosen_from_a_budget():
    from train.disk_budget import estimate_peak_bytes, plan_layer_groups

    peak = {g: max(TRAINING[g], FINAL) + REPORT for g in TRAINING}
    for groups in TRAINING:
        assert estimate_peak_bytes(CONFIG, RANK, groups) == (peak[groups], TRAINING[groups], FINAL)
    assert peak[3] < peak[2]  # uneven groups: three can need less than two, so the search tries every count
    for budget, groups in ((peak[1], 1), (peak[1] - 1, 2), (peak[2] - 1, 3), (peak[3] - 1, 4)):
        plan = plan_layer_groups(CONFIG, RANK, budget / 1e9)
        assert (plan.layer_groups, plan.estimated_peak_bytes) == (groups, peak[groups])
    assert plan_layer_groups(CONFIG, RANK, peak[1] / 1e9, groups=3).layer_groups == 3  # asked for, and it fits


def test_a_budget_no_grouping_meets_names_the_size_needed():
    from train.disk_budget import DiskBudgetError, plan_layer_groups

    least = max(TRAINING[4], FINAL) + REPORT
    with pytest.raises(DiskBudgetError, match=f"needs at least {least / 1e9:.3g} GB of disk at rank 4"):
        plan_layer_groups(CONFIG, RANK, (least - 1) / 1e9)
    with pytest.raises(DiskBudgetError, match="--layer-groups 1 needs"):
        plan_layer_groups(CONFIG, RANK, (least - 1) / 1e9, groups=1)
    with pytest.raises(ValueError, match="must be > 0"):
        plan_layer_groups(CONFIG, RANK, 0.0)


def _dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # renamed or removed while we walk
                total += os.stat(os.path.join(root, name)).st_size
    return total


def test_a_run_stays_under_its_disk_budget(reference_model_dir, tmp_path, monkeypatch):
    """The reference model at rank 64 under a budget that one group would exceed: the work dir's size, measured
    at every rename (when a new file or directory stands beside the one it replaces: the peaks), stays within it."""
    import train.disk_budget
    from train.__main__ import main as train_main

    corpus = tmp_path / "docs.jsonl"
    with lzma.open(SHARED / "data" / "wiki2015" / "validation.jsonl.xz", "rt") as f:
        corpus.write_text("".join(line for _, line in zip(range(30), f)))
    # The fixed room for the report is meant for real sizes: a smaller one keeps the state's share of the
    # estimate large enough to test.
    monkeypatch.setattr(train.disk_budget, "REPORT_FIXED_BYTES", 5 * 10**5)
    work = tmp_path / "work"
    samples = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def measured(src, dst, *args, real=real, **kwargs):
            samples.append(_dir_bytes(work))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, measured)
    budget_gb = 0.02  # two groups of 4 layers (one group would need 0.03)
    argv = ["--model", str(reference_model_dir), "--data", str(corpus), "--work-dir", str(work), "--store", "stream"]
    argv += ["--max-tokens", "1200", "--seq-len", "32", "--batch-size", "4", "--mix-tokens", "128", "--rank", "64"]
    argv += ["--epochs", "1", "--train-batch-size", "64", "--checkpoint-every", "2", "--quiet", "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train_main(argv + ["--stream-disk-budget-gb", str(budget_gb)]) == 0
    plan = json.loads(stdout.getvalue())["stream"]["disk_plan"]
    assert plan["layer_groups"] == 2 and plan["estimated_peak_bytes"] <= budget_gb * 1e9
    assert max(samples) <= budget_gb * 1e9, (max(samples), plan)
    # The estimate is not loose: the two copies of a checkpoint it counts were seen on disk.
    assert max(samples) >= 0.9 * plan["training_peak_bytes"], (max(samples), plan)
    assert f"{plan['layer_groups']} layer group(s)" in (work / "report.md").read_text()
