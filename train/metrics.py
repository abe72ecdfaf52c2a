"""Predictor quality metrics, accumulated over chunks of held-out tokens (exact counts on the host; the sorts run on
the accelerator where there is one, see `labels_in_score_order`).

Definitions (the report and the tests use these):
- threshold metrics (a predictor's own decision, score > 0 i.e. sigmoid > 0.5), pooled over tokens and outputs:
  recall = TP / (TP + FN), precision = TP / (TP + FP), true density = mean(label), predicted density = mean(pred).
- top-K metrics (what the sparse model computes: the K best-scored outputs per token):
  recall@K = mean over tokens of |topK ∩ active| / |active| (a token with nothing active has recall 1),
  precision@K = mean over tokens of |topK ∩ active| / K, predicted density = K / outputs.
- head mass recall@K = mean over tokens of (sum of the norms of the K best-scored heads) / (sum of all head norms).
- lower confidence bound on a mean recall (`recall_lower_bound`): the tokens are grouped into sampling units (the
  512-token windows: tokens of one window are correlated, windows much less so). With G units, S_g the sum of the
  unit's per-token recalls and n_g its token count, the mean is r = sum S_g / sum n_g and its cluster-robust standard
  error is SE = sqrt(G / (G - 1) * sum (S_g - r n_g)^2) / sum n_g (the ratio estimator's linearised variance); the
  bound is r - t * SE, t the `confidence` quantile of Student's t with G - 1 degrees of freedom (0 at confidence
  0.5, where the bound is the mean itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


def head_labels(norms, mass: float, xp=np):
    """[N, H] norms -> [N, H] bool: the fewest heads, taken by decreasing norm, whose norms reach `mass` of the
    token's total (a head is in when the mass of the heads before it is still short of the target).

    `xp` is numpy (float64, on the host) or jax.numpy (float32, traceable: the streaming trainer labels on device).
    """
    norms = xp.asarray(norms, np.float64 if xp is np else np.float32)
    order = xp.argsort(-norms, axis=1, stable=True)
    sorted_norms = xp.take_along_axis(norms, order, axis=1)
    before = xp.cumsum(sorted_norms, axis=1) - sorted_norms
    total = sorted_norms.sum(axis=1, keepdims=True)
    active_sorted = before < mass * total
    # Back to head order: the inverse of a permutation is its argsort.
    return xp.take_along_axis(active_sorted, xp.argsort(order, axis=1), axis=1)


class BinaryCounts:
    """Threshold metrics pooled over every (token, output) pair."""

    def __init__(self):
        self.tp = self.n_label = self.n_pred = self.n = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        pred, label = np.asarray(pred, bool), np.asarray(label, bool)
        assert pred.shape == label.shape, (pred.shape, label.shape)
        self.tp += int(np.count_nonzero(pred & label))
        self.n_label += int(np.count_nonzero(label))
        self.n_pred += int(np.count_nonzero(pred))
        self.n += label.size

    def result(self) -> dict:
        return {
            "recall": self.tp / self.n_label if self.n_label else 1.0,
            "precision": self.tp / self.n_pred if self.n_pred else 1.0,
            "true_density": self.n_label / self.n if self.n else 0.0,
            "predicted_density": self.n_pred / self.n if self.n else 0.0,
        }


def confidence_quantile(confidence: float, units: int) -> float:
    """The one-sided Student-t quantile for a lower bound at `confidence` from `units` sampling units (G - 1 degrees
    of freedom); 0 at confidence 0.5 (the bound is the mean)."""
    assert 0.5 <= confidence < 1, confidence
    if confidence == 0.5:
        return 0.0
    assert units >= 2, units
    return float(scipy.stats.t.ppf(confidence, units - 1))


def cluster_lower_bound(unit_sums: np.ndarray, unit_tokens: np.ndarray, confidence: float) -> np.ndarray:
    """unit_sums [G, ...] (per unit, the sum of its tokens' recalls), unit_tokens [G] -> [...]: the mean recall
    minus t * its cluster-robust standard error (see the module docstring)."""
    unit_sums = np.asarray(unit_sums, np.float64)
    unit_tokens = np.asarray(unit_tokens, np.float64).reshape((-1,) + (1,) * (unit_sums.ndim - 1))
    g, n = len(unit_sums), unit_tokens.sum()
    mean = unit_sums.sum(axis=0) / n
    t = confidence_quantile(confidence, g)
    if t == 0.0:
        return mean
    residual = unit_sums - mean * unit_tokens
    se = np.sqrt(g / (g - 1) * (residual**2).sum(axis=0)) / n
    return mean - t * se


class TopKCurve:
    """Per-K sums over tokens, for every K = 1..M at once: recall (label or mass) and hits.

    Updates that pass `units` (each token's sampling unit, e.g. its window) also keep per-unit recall sums, for
    `recall_lower_bound`.
    """

    def __init__(self, num_outputs: int):
        self.m = num_outputs
        self.recall_sum = np.zeros(num_outputs, np.float64)  # sum over tokens of recall@K
        self.hits_sum = np.zeros(num_outputs, np.float64)  # sum over tokens of |topK ∩ active|
        self.n_tokens = 0
        self.n_active = 0
        self.unit_recall_sums: dict[int, np.ndarray] = {}  # unit -> [M] sum over its tokens of recall@K
        self.unit_tokens: dict[int, int] = {}

    def _add_units(self, units, per_unit_sums, unit_ids) -> None:
        counts = np.bincount(units, minlength=len(unit_ids))
        for i, unit in enumerate(unit_ids.tolist()):
            if unit in self.unit_recall_sums:
                self.unit_recall_sums[unit] += per_unit_sums[i]
                self.unit_tokens[unit] += int(counts[i])
            else:
                self.unit_recall_sums[unit] = per_unit_sums[i].copy()
                self.unit_tokens[unit] = int(counts[i])

    def _order(self, scores):
        return descending_row_order(scores)

    def update(self, scores: np.ndarray, labels: np.ndarray, units: np.ndarray | None = None) -> None:
        """Label recall: labels [N, M] bool (`units` [N] int: each token's sampling unit, optional). Each active
        output's rank in its token's score order is a histogram bin (weighted by 1 / the token's active count for
        recall), and the curves are the histograms' running sums; per unit, the bins are (unit, rank)."""
        labels = np.asarray(labels, bool)
        assert scores.shape == labels.shape and labels.shape[1] == self.m, (scores.shape, labels.shape)
        in_order = labels_in_score_order(scores, labels)
        token, rank = np.nonzero(in_order)
        n_pos = labels.sum(axis=1)
        self.recall_sum += np.cumsum(np.bincount(rank, weights=1.0 / n_pos[token], minlength=self.m))
        self.recall_sum += float((n_pos == 0).sum())  # a token with nothing active has recall 1 at every K
        if units is not None:
            unit_ids, local = np.unique(np.asarray(units), return_inverse=True)
            g = len(unit_ids)
            bins = np.bincount(local[token] * self.m + rank, weights=1.0 / n_pos[token], minlength=g * self.m)
            sums = np.cumsum(bins.reshape(g, self.m), axis=1)
            sums += np.bincount(local, weights=(n_pos == 0).astype(np.float64), minlength=g)[:, None]
            self._add_units(local, sums, unit_ids)
        self.hits_sum += np.cumsum(np.bincount(rank, minlength=self.m))
        self.n_tokens += labels.shape[0]
        self.n_active += int(n_pos.sum())

    def update_mass(
        self, scores: np.ndarray, norms: np.ndarray, labels: np.ndarray, units: np.ndarray | None = None
    ) -> None:
        """Mass recall from norms [N, M] (hits counted against `labels`, e.g. head_labels(norms, mass); `units` as
        in `update`)."""
        norms = np.asarray(norms, np.float64)
        order = self._order(scores)
        kept_mass = np.cumsum(np.take_along_axis(norms, order, axis=1), axis=1)
        total = norms.sum(axis=1, keepdims=True)
        per_token = np.where(total > 0, kept_mass / np.where(total > 0, total, 1), 1.0)
        self.recall_sum += per_token.sum(axis=0)
        if units is not None:
            unit_ids, local = np.unique(np.asarray(units), return_inverse=True)
            sums = np.zeros((len(unit_ids), self.m), np.float64)
            np.add.at(sums, local, per_token)
            self._add_units(local, sums, unit_ids)
        labels = np.asarray(labels, bool)
        self.hits_sum += np.cumsum(np.take_along_axis(labels, order, axis=1), axis=1).sum(axis=0)
        self.n_tokens += norms.shape[0]
        self.n_active += int(labels.sum())

    def recall(self) -> np.ndarray:
        """[M]: mean recall at K = 1..M."""
        return self.recall_sum / max(self.n_tokens, 1)

    @property
    def units(self) -> int:
        """How many sampling units the updates with `units` saw."""
        return len(self.unit_tokens)

    def recall_lower_bound(self, confidence: float) -> np.ndarray:
        """[M]: at K = 1..M, the lower `confidence` bound on the mean recall over the units' population
        (`cluster_lower_bound`); at confidence 0.5 exactly `recall()`. Needs every update to have passed `units`,
        and, above 0.5, at least 2 units."""
        if confidence == 0.5:
            return self.recall()
        assert sum(self.unit_tokens.values()) == self.n_tokens, "every update must pass units"
        if self.units < 2:
            raise ValueError(f"a confidence bound needs at least 2 sampling units. Got {self.units}")
        units = sorted(self.unit_tokens)
        sums = np.stack([self.unit_recall_sums[u] for u in units])
        return cluster_lower_bound(sums, np.array([self.unit_tokens[u] for u in units]), confidence)

    def at(self, k: int) -> dict:
        assert 1 <= k <= self.m, k
        n = max(self.n_tokens, 1)
        return {
            "k": int(k),
            "recall": float(self.recall_sum[k - 1] / n),
            "precision": float(self.hits_sum[k - 1] / (n * k)),
            "label_recall": float(self.hits_sum[k - 1] / self.n_active) if self.n_active else 1.0,
            "true_density": self.n_active / (n * self.m),
            "predicted_density": k / self.m,
        }


def smallest_k(recall_curve: np.ndarray, target: float, block: int) -> tuple[int, int]:
    """(raw K, K rounded up to a multiple of `block` and capped at the output count) for a mean-recall target."""
    m = len(recall_curve)
    reached = np.nonzero(recall_curve >= target - 1e-12)[0]
    raw = int(reached[0]) + 1 if len(reached) else m
    return raw, min(-(-raw // block) * block, m)


class ThresholdCalibration:
    """Mean per-token recall as a function of a score threshold (a neuron is chosen when its score >= t).

    A token's recall at t is (its active outputs with score >= t) / (its active outputs), 1 with none active, so the
    mean over tokens is a weighted count of active (token, output) pairs above t, each pair weighing 1 / (its
    token's active count): `threshold(target)` is a weighted quantile of the active pairs' scores. `update_mass`
    feeds mass recall instead (the heads': each pair weighs its share of the token's total norm). With `units`
    (each token's sampling unit) passed to every update, `threshold(target, confidence)` is the largest threshold
    whose lower confidence bound on the mean recall (`cluster_lower_bound`) reaches the target.
    """

    def __init__(self):
        self.scores, self.weights, self.pair_units = [], [], []
        self.n_tokens = self.n_empty = 0
        self.unit_tokens: dict[int, int] = {}  # unit -> its token count
        self.unit_empty: dict[int, int] = {}  # unit -> its tokens with nothing active (recall 1 at any threshold)

    def update(self, scores: np.ndarray, labels: np.ndarray, units: np.ndarray | None = None) -> None:
        labels = np.asarray(labels, bool)
        n_pos = labels.sum(axis=1)
        rows, _ = np.nonzero(labels)
        self._add(np.asarray(scores, np.float32)[labels], 1.0 / n_pos[rows], rows, n_pos == 0, units)

    def update_mass(self, scores: np.ndarray, norms: np.ndarray, units: np.ndarray | None = None) -> None:
        """Mass recall (the heads' measure): a token's recall at t is the norm of its outputs with score >= t over
        the norm of all its outputs (1 when that is 0), so each (token, output) pair of nonzero norm weighs its
        share of the token's total."""
        norms = np.asarray(norms, np.float64)
        total = norms.sum(axis=1)
        has_mass = norms > 0
        rows, _ = np.nonzero(has_mass)
        weights = norms[has_mass] / total[rows]
        self._add(np.asarray(scores, np.float32)[has_mass], weights, rows, total == 0, units)

    def _add(self, pair_scores, pair_weights, pair_rows, empty, units) -> None:
        """One chunk's pairs (score, weight, token row) and its tokens' emptiness (recall 1 at any threshold)."""
        self.n_tokens += len(empty)
        self.n_empty += int(empty.sum())
        self.scores.append(pair_scores)
        self.weights.append(pair_weights)
        if units is not None:
            units = np.asarray(units, np.int64)
            self.pair_units.append(units[pair_rows])
            unit_ids, local = np.unique(units, return_inverse=True)
            tokens = np.bincount(local, minlength=len(unit_ids))
            empty_in_unit = np.bincount(local, weights=empty, minlength=len(unit_ids))
            for i, unit in enumerate(unit_ids.tolist()):
                self.unit_tokens[unit] = self.unit_tokens.get(unit, 0) + int(tokens[i])
                self.unit_empty[unit] = self.unit_empty.get(unit, 0) + int(empty_in_unit[i])

    # The threshold sits this far (relative) below the score that reaches the target, so the same scores computed
    # in another batch shape or precision (a few fp32 ulps apart) still clear it.
    MARGIN = 1e-5

    def threshold(self, target: float, confidence: float = 0.5) -> float:
        """The score that reaches `target` (`score_at`), lowered by a relative MARGIN."""
        s = self.score_at(target, confidence)
        return s - self.MARGIN * (1.0 + abs(s)) if np.isfinite(s) else s

    def score_at(self, target: float, confidence: float = 0.5) -> float:
        """The largest threshold whose mean recall over the tokens seen (confidence 0.5), or whose lower
        `confidence` bound on the mean recall, reaches `target`."""
        if confidence != 0.5:
            return self._score_at_bound(target, confidence)
        need = target * self.n_tokens - self.n_empty - 1e-9
        if need <= 0 or not self.scores:
            return float("inf")
        scores, weights = np.concatenate(self.scores), np.concatenate(self.weights)
        order = descending_order(scores)  # the order among equal scores cannot change the score returned
        reached = np.nonzero(np.cumsum(weights[order]) >= need)[0]
        return float(scores[order[reached[0]]]) if len(reached) else float(scores.min())

    def _score_at_bound(self, target: float, confidence: float) -> float:
        assert sum(self.unit_tokens.values()) == self.n_tokens, "every update must pass units"
        if len(self.unit_tokens) < 2:
            raise ValueError(f"a confidence bound needs at least 2 sampling units. Got {len(self.unit_tokens)}")
        unit_ids = np.array(sorted(self.unit_tokens))
        n_g = np.array([self.unit_tokens[u] for u in unit_ids.tolist()], np.float64)
        empty_g = np.array([self.unit_empty[u] for u in unit_ids.tolist()], np.float64)
        g, n, t = len(unit_ids), n_g.sum(), confidence_quantile(confidence, len(unit_ids))

        def bound(sum_s, sum_s2, sum_sn):  # cluster_lower_bound from the sums over units of S, S^2 and S*n
            mean = sum_s / n
            residual_ss = np.maximum(sum_s2 - 2 * mean * sum_sn + mean**2 * (n_g**2).sum(), 0.0)
            return mean - t * np.sqrt(g / (g - 1) * residual_ss) / n

        if bound(empty_g.sum(), (empty_g**2).sum(), (empty_g * n_g).sum()) >= target - 1e-12 or not self.scores:
            return float("inf")  # choosing nothing already reaches it
        scores, weights = np.concatenate(self.scores), np.concatenate(self.weights)
        pair_unit = np.searchsorted(unit_ids, np.concatenate(self.pair_units))
        # The bound never exceeds the mean, so the threshold lies at or below the score where the mean reaches the
        # target: the pairs above that (the head) enter only as per-unit totals, and only the rest is ordered.
        head = _top_weight_under(scores, weights, target * n - empty_g.sum() - 1e-6 * n)
        start_g = empty_g + np.bincount(pair_unit[head], weights=weights[head], minlength=g)
        tail = ~head
        scores, weights, pair_unit = scores[tail], weights[tail], pair_unit[tail]
        order = descending_order(scores)
        scores, weights, pair_unit = scores[order], weights[order], pair_unit[order]
        # S_g before each pair joins: its unit's start (empty tokens, head pairs) plus the unit's earlier pairs (a
        # cumulative sum within each unit, in score order), so adding pair p raises sum S^2 by 2 S_g a_p + a_p^2.
        # numpy's stable sort is a radix sort for 16-bit keys: ~3x faster on tens of millions of pairs.
        by_unit = np.argsort(pair_unit.astype(np.uint16) if g <= 1 << 16 else pair_unit, kind="stable")
        cum = np.cumsum(weights[by_unit])
        unit_start = np.searchsorted(pair_unit[by_unit], np.arange(g))
        start_offset = np.concatenate([[0.0], cum])[unit_start]
        before = np.empty_like(weights)
        before[by_unit] = cum - weights[by_unit] - start_offset[pair_unit[by_unit]]
        s_before = start_g[pair_unit] + before
        sum_s = start_g.sum() + np.cumsum(weights)
        sum_s2 = (start_g**2).sum() + np.cumsum(2 * s_before * weights + weights**2)
        sum_sn = (start_g * n_g).sum() + np.cumsum(weights * n_g[pair_unit])
        # A threshold chooses every pair with an equal score, so only the last pair of each run of equal scores is
        # a threshold's state.
        last_of_run = np.nonzero(np.append(scores[1:] != scores[:-1], True))[0]
        ok = bound(sum_s[last_of_run], sum_s2[last_of_run], sum_sn[last_of_run]) >= target - 1e-12
        reached = last_of_run[ok]
        return float(scores[reached[0]]) if len(reached) else float(scores[-1])


def _top_weight_under(scores: np.ndarray, weights: np.ndarray, need: float, bins: int = 4096) -> np.ndarray:
    """[P] bool: a set of the highest-scored pairs whose weights sum to less than `need`, every other pair scored
    below all of them (so no run of equal scores is split): the score range cut in `bins` equal bins, the bins from
    the top while their summed weight stays under `need`. Empty when `need` <= 0 or one bin would reach it."""
    if need <= 0 or len(scores) == 0:
        return np.zeros(len(scores), bool)
    lo, hi = np.float32(scores.min()), np.float32(scores.max())
    if not hi > lo:
        return np.zeros(len(scores), bool)
    # float32 rounding is monotone, so equal scores share a bin and a higher score never falls in a lower bin.
    index = np.minimum(((scores - lo) * np.float32(bins / (float(hi) - float(lo)))).astype(np.int64), bins - 1)
    from_top = np.cumsum(np.bincount(index, weights=weights, minlength=bins)[::-1])
    crossing = int(np.searchsorted(from_top, need))  # the first bin from the top whose sum reaches `need`
    if crossing >= bins:  # the whole weight stays under `need`
        return np.zeros(len(scores), bool)
    return index > bins - 1 - crossing


class ThresholdCounts:
    """What a threshold does on held-out tokens: mean recall, mean density, and the per-token counts' tail."""

    def __init__(self, threshold: float, num_outputs: int, k: int):
        self.t, self.m, self.k = threshold, num_outputs, k
        self.recall_sum = 0.0
        self.counts = []

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        chosen = np.asarray(scores) >= self.t
        labels = np.asarray(labels, bool)
        n_pos = labels.sum(axis=1)
        hits = (chosen & labels).sum(axis=1)
        self.recall_sum += float(np.where(n_pos > 0, hits / np.maximum(n_pos, 1), 1.0).sum())
        self.counts.append(chosen.sum(axis=1))

    def update_mass(self, scores: np.ndarray, norms: np.ndarray) -> None:
        """Mass recall (`ThresholdCalibration.update_mass`) from norms [N, M]."""
        chosen = np.asarray(scores) >= self.t
        norms = np.asarray(norms, np.float64)
        total, kept = norms.sum(axis=1), np.where(chosen, norms, 0.0).sum(axis=1)
        self.recall_sum += float(np.where(total > 0, kept / np.where(total > 0, total, 1.0), 1.0).sum())
        self.counts.append(chosen.sum(axis=1))

    def result(self) -> dict:
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.int64)
        n = max(len(counts), 1)
        return {
            "threshold": self.t,
            "recall": self.recall_sum / n,
            "density": float(counts.sum() / (n * self.m)),
            "max_density": float(counts.max() / self.m) if len(counts) else 0.0,
            "p99_density": float(np.percentile(counts, 99) / self.m) if len(counts) else 0.0,
            "above_k_fraction": float((counts > self.k).mean()) if len(counts) else 0.0,
        }


def descending_row_order(scores: np.ndarray) -> np.ndarray:
    """[N, M] indices sorting each row of `scores` by decreasing value, ties by index (the stable order), on the
    host. numpy's stable sort of float32 is a merge sort, ~4x slower than its vectorised quicksort, so rows are
    sorted by the quicksort and its ties then put in index order: a pair of equal neighbours (thousands of float32
    scores a row have a few) is swapped where it is out of order; a row with three or more equal values in a run
    is sorted again stably."""
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, order, axis=1)
    equal = ranked[:, 1:] == ranked[:, :-1]  # [N, M - 1]: position j ties with j + 1
    if not equal.any():
        return order
    long_runs = np.nonzero((equal[:, 1:] & equal[:, :-1]).any(axis=1))[0]
    equal[long_runs] = False
    row, col = np.nonzero(equal)  # disjoint pairs (col, col + 1)
    swap = order[row, col] > order[row, col + 1]
    row, col = row[swap], col[swap]
    order[row, col], order[row, col + 1] = order[row, col + 1], order[row, col]
    if len(long_runs):
        order[long_runs] = np.argsort(-scores[long_runs], axis=1, kind="stable")
    return order


@jax.jit
def _labels_in_score_order_xla(scores, labels):
    order = jnp.argsort(-scores, axis=1, stable=True)
    return jnp.packbits(jnp.take_along_axis(labels, order, axis=1), axis=1)


def labels_in_score_order(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, M] bool: each token's labels in the order of decreasing score (ties by index).

    The sort is the calibration's cost (an opt-6.7b layer's 16,384 scores for thousands of tokens): on an
    accelerator XLA sorts there (the labels come back packed, 1 bit each); on a CPU-only machine numpy sorts (XLA's
    CPU sort is ~3x slower). Both are the same stable order, so the result does not depend on the backend.
    """
    scores = np.asarray(scores, np.float32)
    if jax.default_backend() == "cpu":
        return np.take_along_axis(labels, descending_row_order(scores), axis=1)
    packed = _labels_in_score_order_xla(jnp.asarray(scores), jnp.asarray(labels))
    return np.unpackbits(np.asarray(packed), axis=1, count=labels.shape[1]).astype(bool)


@jax.jit
def _descending_order_xla(values):
    return jnp.argsort(-values)


def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices that sort a 1-D float32 array by decreasing value (equal values in any order), on the accelerator
    where there is one (a layer's active (token, neuron) pairs: tens of millions at opt-6.7b), else by numpy."""
    values = np.asarray(values, np.float32)
    if jax.default_backend() == "cpu":
        return np.argsort(-values)
    return np.asarray(_descending_order_xla(jnp.asarray(values)))
