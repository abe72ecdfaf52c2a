"""disk_budget: what stream mode keeps on disk, and how many layer groups keep its peak within a budget.

Stream mode writes no activations; its disk use is (under `WORK_DIR`):
- the resume state of the group in training (`stream-state/checkpoint.npz`): its layers' predictors and both Adam
  moments, float32 (`STATE_BYTES_PER_PARAM` per parameter). A checkpoint is written beside the previous one and
  then renamed over it, so two copies exist for a moment;
- each finished group's predictors, float16 (`PREDICTOR_BYTES_PER_PARAM`), written once when the group ends; the
  group's resume state is then dropped from the checkpoint;
- at the end, the predictors directory (float16) and, while calibration rewrites it, its new copy beside it; the
  report and metadata (`report_allowance_bytes`, with room to spare, twice: a rerun writes them beside the old).

So training group g (n_g layers, after m_g finished layers) peaks at m_g·P + 2·n_g·S and the end at 3·L·P, with P
and S a layer's predictor and state bytes. More groups lower the first term at the cost of one more pass of the
dense model over the corpus per group. `plan_layer_groups` picks the fewest groups whose peak fits the budget.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from dejavu_jax.config import OPTConfig

PREDICTOR_BYTES_PER_PARAM = 2  # finished predictors are kept float16
STATE_BYTES_PER_PARAM = 3 * 4  # float32 parameters and Adam's two float32 moments
REPORT_FIXED_BYTES = 2 * 10**6  # report.{md,png}, predictors.json, checkpoint metadata, file headers
REPORT_BYTES_PER_CURVE_POINT = 12  # report.json keeps each layer's recall at every K (ffn + 1 numbers, indented)


class DiskBudgetError(ValueError):
    """The budget cannot be met, even with one layer per group (or with the groups asked for)."""


def predictor_params(d_in: int, rank: int, num_outputs: int) -> int:
    """Parameters of one low-rank predictor d_in -> rank -> num_outputs (weights and biases)."""
    return d_in * rank + rank + rank * num_outputs + num_outputs


def layer_predictor_params(config: OPTConfig, rank: int) -> int:
    """One layer's MLP predictor (d -> r -> ffn) and head predictor (d -> r -> heads)."""
    d = config.hidden_size
    return predictor_params(d, rank, config.ffn_dim) + predictor_params(d, rank, config.num_attention_heads)


def even_layer_groups(num_layers: int, groups: int) -> list[tuple[int, ...]]:
    """`groups` contiguous runs of layers, as even as possible."""
    if groups > num_layers:
        raise ValueError(f"--layer-groups ({groups}) must not exceed the model's {num_layers} layers")
    assert groups > 0, groups
    bounds = np.linspace(0, num_layers, groups + 1).round().astype(int)
    return [tuple(range(bounds[g], bounds[g + 1])) for g in range(groups)]


class DiskPlan(NamedTuple):
    layer_groups: int
    estimated_peak_bytes: int  # the largest of the phases below, report allowance included
    training_peak_bytes: int  # the worst group: finished groups' predictors + two copies of its resume state
    final_peak_bytes: int  # predictors: the finished groups', the predictors directory and calibration's copy
    budget_bytes: int

    def describe(self) -> str:
        return (
            f"{self.layer_groups} layer group(s), estimated peak disk {self.estimated_peak_bytes / 1e9:.3g} GB "
            f"(training {self.training_peak_bytes / 1e9:.3g} GB, predictors at the end "
            f"{self.final_peak_bytes / 1e9:.3g} GB) within --stream-disk-budget-gb {self.budget_bytes / 1e9:g}"
        )


def report_allowance_bytes(config: OPTConfig) -> int:
    """Room for the report and metadata: twice (a new copy beside the old) the per-layer recall curves, plus a
    fixed part."""
    curves = config.num_hidden_layers * (config.ffn_dim + 1) * REPORT_BYTES_PER_CURVE_POINT
    return REPORT_FIXED_BYTES + 2 * curves


def estimate_peak_bytes(config: OPTConfig, rank: int, groups: int) -> tuple[int, int, int]:
    """(peak, training peak, final peak) bytes of a stream run training the layers in `groups` groups."""
    params = layer_predictor_params(config, rank)
    finished_per_layer, state_per_layer = params * PREDICTOR_BYTES_PER_PARAM, params * STATE_BYTES_PER_PARAM
    training, done = 0, 0
    for group in even_layer_groups(config.num_hidden_layers, groups):
        training = max(training, done * finished_per_layer + 2 * len(group) * state_per_layer)
        done += len(group)
    final = 3 * config.num_hidden_layers * finished_per_layer
    return max(training, final) + report_allowance_bytes(config), training, final


def plan_layer_groups(config: OPTConfig, rank: int, budget_gb: float, groups: Optional[int] = None) -> DiskPlan:
    """The fewest layer groups (or `groups`, when given) whose estimated peak disk fits `budget_gb`; raises
    `DiskBudgetError` naming the size needed when none does."""
    if not budget_gb > 0:
        raise ValueError(f"--stream-disk-budget-gb must be > 0. Got {budget_gb}")
    budget = round(budget_gb * 1e9)
    candidates = [groups] if groups is not None else range(1, config.num_hidden_layers + 1)
    for count in candidates:
        peak, training, final = estimate_peak_bytes(config, rank, count)
        if peak <= budget:
            return DiskPlan(count, peak, training, final, budget)
    # Nothing fits: say what would (the smallest peak any grouping reaches, or the groups asked for).
    if groups is None:
        least = min(estimate_peak_bytes(config, rank, n)[0] for n in candidates)
        raise DiskBudgetError(
            f"stream mode needs at least {least / 1e9:.3g} GB of disk at rank {rank} (with the best layer grouping), over "
            f"--stream-disk-budget-gb {budget_gb:g}; raise the budget or lower --rank"
        )
    raise DiskBudgetError(
        f"--layer-groups {groups} needs {peak / 1e9:.3g} GB of disk at rank {rank}, over --stream-disk-budget-gb "
        f"{budget_gb:g}; leave --layer-groups out to choose the count from the budget, or raise the budget"
    )
