"""calibrate: choose K per layer on held-out tokens for a recall target, and store it with the predictors.

The held-out rows (`train/heldout.py`: the last `holdout` fraction of the collection, later documents than any
training row, read from the activation store; or the sample the streaming trainer keeps in memory) are split by
window: even windows calibrate, odd windows test. Per layer, K is the smallest count of top-scored outputs whose
mean recall reaches the target with confidence `recall_confidence` (MLP: of the truly active neurons; heads: of the
head-norm mass), rounded up to a multiple of `block` / `head_block` and capped at the layer's width. Each
predictor's threshold is the largest score threshold whose mean recall (MLP: of the active neurons; heads: of the
head-norm mass) reaches the same target with the same confidence (threshold selection: no sort, the count varies
per token; K stays its static bound). Test-half metrics at that K and threshold (recall, density, and how often a
token's count exceeds K) are what the report shows.

"Reaches the target with confidence c" means the one-sided lower c-confidence bound on the mean recall over unseen
text reaches it (`train/metrics.py`, `cluster_lower_bound`): the calibration windows are the sampling units (a
window's tokens share a context, so their recalls are correlated and the tokens are not independent samples), the
mean's standard error comes from the spread of the per-window recall sums, and the bound is mean - t * SE with t
Student's quantile at c (G - 1 degrees of freedom for G windows). Stopping where the calibration tokens' mean
reaches the target (c = 0.5, t = 0) leaves the mean on new tokens below the target about half the time. When the
calibration rows lie in one window (a held-out part shorter than two windows), tokens are the units instead.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dejavu_jax.predictor_store import load_predictors, predictor_metadata, save_predictors
from train.activations import ActivationStore
from train.fit import score_rows
from train.heldout import HeldOut, StoreHeldOut
from train.metrics import (
    ThresholdCalibration,
    ThresholdCounts,
    TopKCurve,
    confidence_quantile,
    head_labels,
    smallest_k,
)


# The bound is on the mean over unseen text; a finite test sample (the odd windows, or the tokens a model serves)
# has its own sampling noise, about as large as the calibration half's, so the test half's mean clears the target
# about Phi(t / sqrt 2) of the time: ~0.98 per layer at 0.99 with 10 calibration windows (t = 2.82), ~0.90 at 0.95.
DEFAULT_RECALL_CONFIDENCE = 0.99


@dataclasses.dataclass(frozen=True)
class CalibrateOptions:
    recall_target: float = 0.99  # MLP: mean fraction of the truly active neurons kept
    recall_confidence: float = DEFAULT_RECALL_CONFIDENCE  # the targets hold for unseen tokens at this confidence
    head_recall_target: float = 0.99  # heads: mean fraction of the head-norm mass kept
    block: int = 1  # MLP K is a multiple of this (the masked kernels need no rounding)
    head_block: int = 1  # head K is a multiple of this

    def validate(self) -> None:
        for name in ("recall_target", "head_recall_target"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1]. Got {value!r}")
        c = self.recall_confidence
        if not (isinstance(c, (int, float)) and 0.5 <= c < 1):
            raise ValueError(
                f"--recall-confidence must be in [0.5, 1) (0.5: the mean over the calibration tokens reaches the "
                f"target, no margin). Got {c!r}"
            )
        for name in ("block", "head_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer. Got {value!r}")


def holdout_split(store: ActivationStore, holdout: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(n_train, calibration mask, test mask) over the held-out rows [n_train, num_rows), split by window."""
    rows = StoreHeldOut(store, holdout)
    return rows.n_train, rows.calibration, rows.test


def sampling_units(held_out: HeldOut) -> tuple[np.ndarray, str]:
    """([n] int: each held-out row's sampling unit, its name): the row's window, or the row itself when the
    calibration rows lie in fewer than 2 windows (no spread between windows to measure)."""
    if len(np.unique(held_out.window_of_row[held_out.calibration])) >= 2:
        return np.asarray(held_out.window_of_row), "window"
    return np.arange(len(held_out.window_of_row)), "token"


def _layer_scores(predictor, x) -> np.ndarray:
    """[n, outputs] float32: the predictor's scores of every held-out row, computed once per layer and predictor
    (the top-K curves, the threshold search and the test counts all read them)."""
    return np.concatenate([scores for _, scores in score_rows(predictor, x)])


def _curves(halves: dict, num_outputs: int) -> dict:
    """A `TopKCurve` per half: halves[name] = (scores, targets, units or None, norms or None) of that half's rows;
    with norms the curve is of mass recall."""
    curves = {}
    for name, (scores, targets, units, norms) in halves.items():
        curves[name] = TopKCurve(num_outputs)
        if not len(scores):
            continue
        if norms is None:
            curves[name].update(scores, targets, units)
        else:
            curves[name].update_mass(scores, norms, targets, units)
    return curves


def calibrate(
    store: ActivationStore,
    predictors_dir: Path,
    opts: CalibrateOptions,
    save_to: Optional[Path] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Calibrate K per layer on the store's held-out rows; rewrite `predictors_dir` (and `save_to`, a predictors
    dir) with K and metrics."""
    opts.validate()
    meta = predictor_metadata(predictors_dir)
    held_out = StoreHeldOut(store, float(meta.get("fit_options", {}).get("holdout", 0.1)))
    if meta.get("training_tokens") is not None and int(meta["training_tokens"]) != held_out.n_train:
        raise ValueError(
            f"the predictors in {predictors_dir} were fit on {meta['training_tokens']} rows, but the "
            f"activation store now splits at {held_out.n_train} (it holds {store.num_rows}); run fit again"
        )
    return calibrate_held_out(held_out, predictors_dir, opts, save_to=save_to, log=log)


def calibrate_held_out(
    held_out: HeldOut,
    predictors_dir: Path,
    opts: CalibrateOptions,
    save_to: Optional[Path] = None,
    log: Optional[Callable[[str], None]] = None,
    workers: Optional[int] = None,
) -> dict:
    """Calibrate K and the threshold per layer on `held_out`'s calibration rows, measure them on its test rows;
    rewrite `predictors_dir` (and `save_to`) with K, thresholds and metrics. Returns the report's result. `workers`
    layers are calibrated at once (default `calibration_workers()`); the result does not depend on it."""
    opts.validate()
    start_time = time.perf_counter()
    config = held_out.config
    predictors = load_predictors(predictors_dir, config)
    meta = predictor_metadata(predictors_dir)
    fit_options = meta.get("fit_options", {})
    label_mass = float(fit_options.get("head_label_mass", 0.9))
    units, unit_name = sampling_units(held_out)
    n_units = len(np.unique(units[held_out.calibration]))
    workers = workers or calibration_workers()
    layers = []
    run = functools.partial(_calibrate_layer, held_out, predictors, opts, label_mass, units)
    with ThreadPoolExecutor(workers) as pool:  # results come back in layer order
        for entry in pool.map(run, range(config.num_hidden_layers)):
            layers.append(entry)
            if log:
                log(_layer_line(entry, config))

    calibrated = predictors.with_k([e["mlp"]["k"] for e in layers], [e["heads"]["k"] for e in layers])
    calibrated = calibrated.with_threshold(
        [e["mlp"]["threshold"] for e in layers], [e["heads"]["threshold"] for e in layers]
    )
    calibration = {
        "recall_target": opts.recall_target,
        "head_recall_target": opts.head_recall_target,
        "recall_confidence": opts.recall_confidence,
        "confidence_quantile": confidence_quantile(opts.recall_confidence, n_units),
        "sampling_unit": unit_name,
        "calibration_units": n_units,
        "block": opts.block,
        "head_block": opts.head_block,
        "calibration_tokens": int(held_out.calibration.sum()),
        "test_tokens": int(held_out.test.sum()),
        "split": held_out.split,
        "seconds": time.perf_counter() - start_time,
        "layers": [{k: v for k, v in e.items()} for e in layers],
    }
    metadata = {k: v for k, v in meta.items() if k not in ("calibration",)}
    metadata.update(
        {
            "stage": "calibrated",
            "recall_target": opts.recall_target,
            "head_recall_target": opts.head_recall_target,
            "recall_confidence": opts.recall_confidence,
            "calibration": _without_curves(calibration),
        }
    )
    save_predictors(calibrated, predictors_dir, metadata)
    if save_to is not None:
        save_predictors(calibrated, save_to, metadata)
    return {
        "predictors": str(predictors_dir),
        "saved_to": None if save_to is None else str(save_to),
        "mlp_k": list(calibrated.mlp_k),
        "head_k": list(calibrated.head_k),
        **calibration,
        "fit": meta.get("fit_metrics"),
        "fit_options": fit_options,
        "training_tokens": meta.get("training_tokens"),
        "mlp_input": predictors.mlp_input,
        "model": meta.get("model"),
        "activations": meta.get("activations"),
    }


def calibration_workers() -> int:
    """Layers calibrated at once: one per 4 CPU cores, at most 4, so 1 on a 2-core machine. Each holds one layer's
    scores (float32, ~0.4 GB for 5,900 held-out tokens at opt-6.7b) and its active (token, neuron) pairs while it
    searches the threshold (~1.5 GB more there for a random model, whose ReLUs fire for half the neurons), and numpy
    releases the GIL in the sorts and array passes that cost the time."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _calibrate_layer(held_out: HeldOut, predictors, opts: CalibrateOptions, label_mass: float, units, layer: int):
    """One layer's K, threshold and test metrics (the report's entry); independent of every other layer."""
    config = held_out.config
    calib, test = held_out.calibration, held_out.test
    clock = _PhaseClock()
    x_mlp = held_out.read(layer, predictors.mlp_input)
    labels = held_out.read_labels(layer)
    clock.lap("read")
    scores = _layer_scores(predictors.mlp[layer], x_mlp)
    del x_mlp
    clock.lap("score")
    # Each half's rows are gathered once: the curves, the threshold search and the test counts share them.
    cal_units = units[calib]
    cal_scores, cal_labels, test_scores, test_labels = scores[calib], labels[calib], scores[test], labels[test]
    del scores, labels
    halves = {"calibration": (cal_scores, cal_labels, cal_units, None), "test": (test_scores, test_labels, None, None)}
    curves = _curves(halves, config.ffn_dim)
    mlp_bound = curves["calibration"].recall_lower_bound(opts.recall_confidence)
    mlp_raw, mlp_k = smallest_k(mlp_bound, opts.recall_target, opts.block)
    clock.lap("top_k")
    threshold = _calibrate_threshold(cal_scores, cal_labels, cal_units, opts)
    clock.lap("threshold")
    threshold_test = ThresholdCounts(threshold, config.ffn_dim, mlp_k)
    if len(test_scores):
        threshold_test.update(test_scores, test_labels)
    del halves, cal_scores, cal_labels, test_scores, test_labels
    clock.lap("threshold_test")

    x_head = held_out.read(max(layer - 1, 0), "attn_input")
    norms = held_out.read(layer, "head_norm")
    scores = _layer_scores(predictors.heads[layer], x_head)
    del x_head
    targets = head_labels(norms, label_mass)
    # each half's rows gathered once: the curves, the threshold search and the test counts share them
    cal_scores, cal_norms, test_scores, test_norms = scores[calib], norms[calib], scores[test], norms[test]
    halves = {
        "calibration": (cal_scores, targets[calib], cal_units, cal_norms),
        "test": (test_scores, targets[test], None, test_norms),
    }
    head_curves = _curves(halves, config.num_attention_heads)
    oracle = TopKCurve(config.num_attention_heads)  # the heads with the largest true norms
    oracle.update_mass(test_norms, test_norms, head_labels(test_norms, label_mass))
    head_bound = head_curves["calibration"].recall_lower_bound(opts.recall_confidence)
    head_raw, head_k = smallest_k(head_bound, opts.head_recall_target, opts.head_block)
    head_cal = ThresholdCalibration()
    if calib.any():
        head_cal.update_mass(cal_scores, cal_norms, cal_units)
    head_threshold = head_cal.threshold(opts.head_recall_target, opts.recall_confidence)
    head_threshold_test = ThresholdCounts(head_threshold, config.num_attention_heads, head_k)
    if len(test_norms):
        head_threshold_test.update_mass(test_scores, test_norms)
    clock.lap("heads")
    entry = {
        "layer": layer,
        "mlp": {
            "k_raw": mlp_raw,
            "k": mlp_k,
            "calibration": {**curves["calibration"].at(mlp_k), "recall_bound": float(mlp_bound[mlp_k - 1])},
            "test": curves["test"].at(mlp_k),
            "threshold": threshold,
            "threshold_test": threshold_test.result(),
            "recall_curve": [round(float(v), 5) for v in curves["test"].recall()],
        },
        "heads": {
            "k_raw": head_raw,
            "k": head_k,
            "calibration": {
                **head_curves["calibration"].at(head_k),
                "recall_bound": float(head_bound[head_k - 1]),
            },
            "test": head_curves["test"].at(head_k),
            "threshold": head_threshold,
            "threshold_test": head_threshold_test.result(),
            "mass_recall_curve": [round(float(v), 5) for v in head_curves["test"].recall()],
            "oracle_mass_recall_curve": [round(float(v), 5) for v in oracle.recall()],
        },
        "seconds": clock.seconds,
    }
    return entry


def _layer_line(entry: dict, config) -> str:
    m, h, t = entry["mlp"]["test"], entry["heads"]["test"], entry["mlp"]["threshold_test"]
    ht = entry["heads"]["threshold_test"]
    return (
        f"  layer {entry['layer']}: MLP K {entry['mlp']['k']:5d}/{config.ffn_dim} ({m['predicted_density']:.1%}, "
        f"true {m['true_density']:.1%}) recall {m['recall']:.4f}; threshold {entry['mlp']['threshold']:.3f}: "
        f"density {t['density']:.1%} recall {t['recall']:.4f} | heads K {entry['heads']['k']}/"
        f"{config.num_attention_heads} mass recall {h['recall']:.4f}; threshold: density {ht['density']:.1%} "
        f"mass recall {ht['recall']:.4f} ({sum(entry['seconds'].values()):.1f} s)"
    )


def _calibrate_threshold(scores, labels, units, opts: CalibrateOptions) -> float:
    """The largest score threshold whose mean recall on the calibration rows (`scores`, `labels`, `units` of those
    rows) reaches the MLP target at the options' confidence."""
    cal = ThresholdCalibration()
    if len(scores):
        cal.update(scores, labels, units)
    return cal.threshold(opts.recall_target, opts.recall_confidence)


class _PhaseClock:
    """Wall seconds of a layer's calibration phases (threads share the cores, so a phase's time includes waiting)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


def _without_curves(calibration: dict) -> dict:
    out = dict(calibration)
    out["layers"] = [
        {
            "layer": e["layer"],
            "mlp": {k: v for k, v in e["mlp"].items() if k != "recall_curve"},
            "heads": {k: v for k, v in e["heads"].items() if not k.endswith("_curve")},
        }
        for e in calibration["layers"]
    ]
    return out
