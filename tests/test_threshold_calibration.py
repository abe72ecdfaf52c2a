"""Threshold calibration: the largest score threshold whose mean per-token recall reaches a target."""

import numpy as np
import pytest

from train.metrics import ThresholdCalibration, ThresholdCounts


def mean_recall(scores, labels, t):
    chosen = scores >= t
    n_pos = labels.sum(1)
    return np.where(n_pos > 0, (chosen & labels).sum(1) / np.maximum(n_pos, 1), 1.0).mean()


@pytest.mark.parametrize("seed, target", [(0, 0.99), (1, 0.9), (2, 0.5)])
def test_threshold_is_the_largest_that_reaches_the_target(seed, target):
    rng = np.random.default_rng(seed)
    labels = rng.random((300, 40)) < 0.1
    labels[:7] = False  # tokens with nothing active have recall 1
    scores = (rng.standard_normal((300, 40)) + 2.0 * labels).astype(np.float32)  # scores are fp32
    cal = ThresholdCalibration()
    for chunk in range(0, 300, 64):  # chunked updates, as calibrate feeds it
        cal.update(scores[chunk : chunk + 64], labels[chunk : chunk + 64])
    s = cal.score_at(target)
    assert mean_recall(scores, labels, s) >= target - 1e-12
    higher = np.sort(np.unique(scores[scores > s]))
    assert len(higher) == 0 or mean_recall(scores, labels, higher[0]) < target  # brute force: the next one misses
    t = cal.threshold(target)  # the stored threshold: a hair below, so recomputed scores still clear it
    assert s - 1e-4 * (1 + abs(s)) < t < s and mean_recall(scores, labels, t) >= target


def test_threshold_edges_and_counts():
    cal = ThresholdCalibration()
    cal.update(np.zeros((4, 3)), np.zeros((4, 3), bool))
    assert cal.threshold(0.99) == float("inf")  # nothing active: choosing nothing has recall 1
    scores = np.array([[3.0, 1.0, -1.0], [0.5, 2.0, 0.0]])
    counts = ThresholdCounts(0.5, num_outputs=3, k=1)
    counts.update(scores, np.array([[True, False, False], [False, False, True]]))
    r = counts.result()
    assert r["recall"] == pytest.approx(0.5) and r["density"] == pytest.approx(4 / 6)
    assert r["max_density"] == pytest.approx(2 / 3) and r["above_k_fraction"] == 1.0
