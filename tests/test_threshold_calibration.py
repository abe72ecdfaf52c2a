"""Threshold calibration: the largest score threshold whose mean per-token recall (or its lower confidence bound,
windows as sampling units) reaches a target; the same bound on top-K recall curves."""

import numpy as np
import pytest
import scipy.stats

from train.metrics import ThresholdCalibration, ThresholdCounts, TopKCurve, cluster_lower_bound, smallest_k


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


# ---- lower confidence bounds, windows as sampling units --------------------------------------------------------


def _by_hand_tokens():
    """4 outputs scored 4, 3, 2, 1 (top-K = the first K); 4 windows of 2 tokens. Recall at K = 1 per token:
    {0} -> 1, {0, 1} -> 0.5; at K >= 2 every token has recall 1."""
    active = [[0], [0], [0], [0, 1], [0, 1], [0, 1], [0], [0]]
    labels = np.zeros((8, 4), bool)
    for token, outputs in enumerate(active):
        labels[token, outputs] = True
    scores = np.tile(np.array([4.0, 3.0, 2.0, 1.0], np.float32), (8, 1))
    windows = np.array([10, 10, 11, 11, 12, 12, 13, 13])  # any ids: only the grouping matters
    return scores, labels, windows


def test_confidence_bound_by_hand():
    import scipy.stats

    scores, labels, windows = _by_hand_tokens()
    # K = 1: window means 1, 0.75, 0.5, 1 -> mean 0.8125, sample variance 0.171875 / 3, SE = sqrt(that / 4).
    t = scipy.stats.t.ppf(0.95, 3)  # 2.353
    want = 0.8125 - t * np.sqrt(0.171875 / 3 / 4)
    curve = TopKCurve(4)
    curve.update(scores[:3], labels[:3], windows[:3])  # chunks may split a window
    curve.update(scores[3:], labels[3:], windows[3:])
    assert curve.units == 4
    np.testing.assert_allclose(curve.recall_lower_bound(0.95), [want, 1, 1, 1], rtol=1e-12)
    assert want == pytest.approx(0.5309, abs=1e-4)
    assert smallest_k(curve.recall_lower_bound(0.5), 0.8, 1) == (1, 1)  # the mean 0.8125 reaches 0.8
    assert smallest_k(curve.recall_lower_bound(0.95), 0.8, 1) == (2, 2)  # its 95% bound 0.531 does not
    assert smallest_k(curve.recall_lower_bound(0.95), 0.5, 1) == (1, 1)
    # Threshold selection: a threshold of 4 keeps output 0 (K = 1's recalls), 3 keeps outputs 0 and 1.
    cal = ThresholdCalibration()
    cal.update(scores, labels, windows)
    assert cal.score_at(0.8) == 4.0 and cal.score_at(0.8, 0.95) == 3.0 and cal.score_at(0.5, 0.95) == 4.0
    # Head mass recall: the same bound over the per-token mass shares.
    norms = np.array([[3.0, 1.0], [1.0, 1.0]] * 4)  # K = 1 keeps 0.75, 0.5 of the mass, alternately
    mass = TopKCurve(2)
    mass.update_mass(-np.arange(2.0)[None].repeat(8, 0), norms, norms > 0, windows)
    # every window has one token of each: window means all 0.625, so SE = 0 and the bound is the mean
    np.testing.assert_allclose(mass.recall_lower_bound(0.99), [0.625, 1.0])


def _brute_force_bound(per_token, windows, confidence):
    ids = np.unique(windows)
    sums = np.array([per_token[windows == w].sum() for w in ids])
    tokens = np.array([(windows == w).sum() for w in ids])
    mean = per_token.mean()
    se = np.sqrt(len(ids) / (len(ids) - 1) * ((sums - mean * tokens) ** 2).sum()) / len(per_token)
    return mean - scipy.stats.t.ppf(confidence, len(ids) - 1) * se


def _random_windows(seed):
    rng = np.random.default_rng(seed)
    n, m = 400, 24
    windows = np.repeat(np.arange(9), rng.integers(20, 70, 9))[:n]  # unequal window sizes
    n = len(windows)
    rate = rng.uniform(0.05, 0.4, 9)[windows]  # windows differ: their recalls are correlated
    labels = rng.random((n, m)) < rate[:, None]
    labels[:5] = False
    scores = np.round(rng.standard_normal((n, m)) + 1.5 * labels, 1).astype(np.float32)  # rounded: many ties
    return scores, labels, windows


@pytest.mark.parametrize("seed, confidence, target", [(0, 0.95, 0.9), (1, 0.8, 0.95), (2, 0.99, 0.8)])
def test_bounds_match_the_formula_per_k_and_per_threshold(seed, confidence, target):

    scores, labels, windows = _random_windows(seed)
    n_pos = labels.sum(1)
    order = np.argsort(-scores, axis=1, kind="stable")
    per_token_k = np.where(
        n_pos[:, None] > 0,
        np.cumsum(np.take_along_axis(labels, order, axis=1), axis=1) / np.maximum(n_pos, 1)[:, None],
        1.0,
    )
    curve = TopKCurve(labels.shape[1])
    for chunk in range(0, len(scores), 64):
        rows = slice(chunk, chunk + 64)
        curve.update(scores[rows], labels[rows], windows[rows])
    want = [_brute_force_bound(per_token_k[:, k], windows, confidence) for k in range(labels.shape[1])]
    np.testing.assert_allclose(curve.recall_lower_bound(confidence), want, rtol=1e-10, atol=1e-12)

    cal = ThresholdCalibration()
    for chunk in range(0, len(scores), 64):
        rows = slice(chunk, chunk + 64)
        cal.update(scores[rows], labels[rows], windows[rows])
    s = cal.score_at(target, confidence)

    def bound_at(t):
        return _brute_force_bound(
            np.where(n_pos > 0, ((scores >= t) & labels).sum(1) / np.maximum(n_pos, 1), 1.0), windows, confidence
        )

    assert bound_at(s) >= target - 1e-12
    higher = np.sort(np.unique(scores[labels & (scores > s)]))
    assert all(bound_at(h) < target for h in higher)  # every larger threshold (an active score) misses


def _curve_and_calibration(seed):
    """A TopKCurve and a ThresholdCalibration fed the same random windowed rows."""
    scores, labels, windows = _random_windows(seed)
    curve, cal = TopKCurve(labels.shape[1]), ThresholdCalibration()
    curve.update(scores, labels, windows)
    cal.update(scores, labels, windows)
    return curve, cal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confidence_one_half_is_the_mean_choice(seed):
    curve, cal = _curve_and_calibration(seed)
    np.testing.assert_array_equal(curve.recall_lower_bound(0.5), curve.recall())
    sums = np.stack([curve.unit_recall_sums[w] for w in sorted(curve.unit_recall_sums)])
    tokens = np.array([curve.unit_tokens[w] for w in sorted(curve.unit_tokens)])
    np.testing.assert_allclose(cluster_lower_bound(sums, tokens, 0.5), curve.recall(), rtol=1e-12)
    for target in (0.5, 0.8, 0.9, 0.95, 0.99):
        mean_k = smallest_k(curve.recall(), target, 1)
        assert smallest_k(cluster_lower_bound(sums, tokens, 0.5), target, 1) == mean_k
        # the bound's own path (cumulative sums per window) at t = 0 picks the mean's threshold
        assert cal._score_at_bound(target, 0.5) == cal.score_at(target) == cal.score_at(target, 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_higher_confidence_never_gives_a_smaller_k_or_a_larger_threshold(seed):
    curve, cal = _curve_and_calibration(seed)
    for target in (0.8, 0.9, 0.95):
        ks = [smallest_k(curve.recall_lower_bound(c), target, 1)[0] for c in (0.5, 0.7, 0.9, 0.95, 0.99, 0.999)]
        thresholds = [cal.threshold(target, c) for c in (0.5, 0.7, 0.9, 0.95, 0.99, 0.999)]
        assert ks == sorted(ks) and thresholds == sorted(thresholds, reverse=True), (ks, thresholds)
        assert ks[-1] > ks[0] and thresholds[-1] < thresholds[0]  # the margin does something here


def test_a_bound_needs_two_units():

    scores, labels, _ = _by_hand_tokens()
    curve, cal = TopKCurve(4), ThresholdCalibration()
    curve.update(scores, labels, np.zeros(8, int))
    cal.update(scores, labels, np.zeros(8, int))
    with pytest.raises(ValueError, match="at least 2 sampling units. Got 1"):
        curve.recall_lower_bound(0.95)
    with pytest.raises(ValueError, match="at least 2 sampling units. Got 1"):
        cal.threshold(0.9, 0.95)
    assert smallest_k(curve.recall_lower_bound(0.5), 0.8, 1) == (1, 1)


def test_sampling_units_are_windows_unless_the_calibration_rows_share_one():
    from types import SimpleNamespace

    from train.calibrate import sampling_units
    from train.heldout import split_by_window

    windows = np.array([4, 4, 5, 5, 6, 6, 6])
    calib, _ = split_by_window(windows)
    units, name = sampling_units(SimpleNamespace(window_of_row=windows, calibration=calib))
    assert name == "window" and units.tolist() == windows.tolist()
    one = np.full(6, 3)  # one window: split in halves, and the calibration half's tokens are the units
    calib, _ = split_by_window(one)
    units, name = sampling_units(SimpleNamespace(window_of_row=one, calibration=calib))
    assert name == "token" and units.tolist() == list(range(6))


@pytest.mark.parametrize("seed, confidence, target", [(3, 0.99, 0.99), (4, 0.9, 0.95), (5, 0.5, 0.8)])
def test_ordering_only_the_tail_gives_the_full_orders_threshold(seed, confidence, target, monkeypatch):
    """The head of high-scored pairs enters the bound as per-unit totals: the threshold is the one the full ordering
    of every pair finds (here with many ties and a tail of a few percent)."""
    import train.metrics as metrics

    rng = np.random.default_rng(seed)
    labels = rng.random((600, 300)) < 0.3
    labels[:9] = False
    scores = np.round(rng.standard_normal((600, 300)) + 2.0 * labels, 2).astype(np.float32)
    windows = np.arange(600) // 50
    cal = ThresholdCalibration()
    cal.update(scores, labels, windows)
    head = metrics._top_weight_under(
        np.concatenate(cal.scores), np.concatenate(cal.weights), target * 600 - 9 - 1e-6 * 600
    )
    assert head.mean() > 0.5  # the shortcut is taken: most pairs are in the head
    fast = cal.score_at(target, confidence)
    monkeypatch.setattr(metrics, "_top_weight_under", lambda s, w, need: np.zeros(len(s), bool))
    assert cal.score_at(target, confidence) == fast


@pytest.mark.parametrize("seed, confidence, target", [(6, 0.5, 0.9), (7, 0.95, 0.9), (8, 0.99, 0.95)])
def test_mass_threshold_is_the_largest_whose_mass_recall_bound_reaches_the_target(seed, confidence, target):
    """Heads' threshold selection: a token's recall at t is the norm of its heads scored >= t over all its heads'
    norm (1 with none). Brute force over every candidate threshold against `update_mass`, in chunks as calibrate
    feeds it; zero-norm heads and all-zero tokens included; `ThresholdCounts.update_mass` measures the same recall."""
    rng = np.random.default_rng(seed)
    n, m = 360, 12
    windows = np.repeat(np.arange(8), 45)
    norms = rng.gamma(0.6, 1.0, (n, m)) * (rng.random((n, m)) < 0.8)
    norms[:6] = 0.0  # nothing to keep: recall 1 at any threshold
    scores = np.round(np.log(norms + 0.05) + rng.standard_normal((n, m)), 1).astype(np.float32)  # ties

    def per_token(t):
        total = norms.sum(1)
        kept = np.where(scores >= t, norms, 0.0).sum(1)
        return np.where(total > 0, kept / np.where(total > 0, total, 1.0), 1.0)

    def bound_at(t):
        return per_token(t).mean() if confidence == 0.5 else _brute_force_bound(per_token(t), windows, confidence)

    cal = ThresholdCalibration()
    for chunk in range(0, n, 100):
        rows = slice(chunk, chunk + 100)
        cal.update_mass(scores[rows], norms[rows], windows[rows])
    s = cal.score_at(target, confidence)
    assert bound_at(s) >= target - 1e-12
    higher = np.sort(np.unique(scores[(norms > 0) & (scores > s)]))
    assert len(higher) and all(bound_at(h) < target for h in higher)  # every larger candidate misses
    counts = ThresholdCounts(s, num_outputs=m, k=4)
    counts.update_mass(scores[:200], norms[:200])
    counts.update_mass(scores[200:], norms[200:])
    result = counts.result()
    assert result["recall"] == pytest.approx(per_token(s).mean(), rel=1e-12)
    assert result["density"] == pytest.approx((scores >= s).mean(), rel=1e-12)
    assert result["above_k_fraction"] == pytest.approx(((scores >= s).sum(1) > 4).mean(), rel=1e-12)
