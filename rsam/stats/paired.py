"""Paired statistics of two evaluations of the same expressions: bootstrap intervals and permutation p-values.

Two models A and B scored on the same N expressions give, per expression, an IoU and the intersection / union
pixel counts. mIoU is the mean IoU, oIoU the ratio of summed intersections to summed unions. The uncertainty
that matters when comparing models on a fixed benchmark is the sampling of expressions: a test set is a sample
of the referring expressions one could have written, so the expression is the resampling unit, and A and B are
resampled together (paired), which removes the difficulty every model shares with the expression.

* bootstrap: ``resamples`` draws of N expressions with replacement; the 2.5th and 97.5th percentiles of the
  resampled mIoU / oIoU of A, of B and of B - A are the 95 % percentile intervals;
* permutation: under "A and B are exchangeable", A's and B's scores of each expression are swapped with
  probability 1/2; the two-sided p-value is (1 + #{|resampled B - A| >= |observed B - A|}) / (1 + resamples).

Both are vectorised: a chunk of resamples is a (chunk, N) matrix of counts (bootstrap) or swap indicators
(permutation) multiplied by the (N, k) matrix of per-expression values, so N = 5,000 and 10,000 resamples take
about a second. Everything is deterministic for a given seed. docs/metrics.md explains how to read the results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import numpy as np

__all__ = ["Scores", "paired_comparison", "compare_by_category"]

# Matrix entries per chunk of resamples: bounds the temporaries (~32 MB of float64) whatever N is.
CHUNK_ENTRIES = 1 << 22


@dataclass
class Scores:
    """Per-expression scores of one model, in the order of the expressions being compared (float64 (N,))."""

    iou: np.ndarray
    intersection: np.ndarray
    union: np.ndarray

    @staticmethod
    def from_counts(intersection: Sequence[float], union: Sequence[float]) -> "Scores":
        """Scores of one evaluation: IoU = intersection / union, 0 where the union is empty (both conventions)."""
        inter = np.asarray(intersection, dtype=np.float64)
        uni = np.asarray(union, dtype=np.float64)
        iou = np.divide(inter, uni, out=np.zeros_like(inter), where=uni > 0)
        return Scores(iou, inter, uni)

    @staticmethod
    def mean_of(runs: Sequence["Scores"]) -> "Scores":
        """The seed average of several runs of one config: mean IoU, mean intersection, mean union per
        expression (so its mIoU and oIoU are the means over the runs of their mIoU and summed I / summed U)."""
        return Scores(*(np.mean([getattr(r, k) for r in runs], axis=0) for k in ("iou", "intersection", "union")))

    def subset(self, index: np.ndarray) -> "Scores":
        return Scores(self.iou[index], self.intersection[index], self.union[index])

    def miou(self) -> float:
        return math.fsum(self.iou.tolist()) / len(self.iou)

    def oiou(self) -> float:
        union = math.fsum(self.union.tolist())
        return math.fsum(self.intersection.tolist()) / union if union > 0 else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _chunks(resamples: int, n: int) -> List[int]:
    size = max(1, min(resamples, CHUNK_ENTRIES // max(n, 1)))
    return [min(size, resamples - start) for start in range(0, resamples, size)]


def _bootstrap(a: Scores, b: Scores, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, 6): mIoU A, mIoU B, mIoU B - A, oIoU A, oIoU B, oIoU B - A of each bootstrap resample."""
    n = len(a.iou)
    # The B - A IoU column gives an exact 0 difference when A and B are the same scores.
    values = np.stack([a.iou, b.iou, b.iou - a.iou, a.intersection, a.union, b.intersection, b.union], axis=1)
    out = []
    for size in _chunks(resamples, n):
        draws = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]  # row r: r*n .. r*n+n-1
        counts = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        sums = counts @ values
        oiou_a, oiou_b = _ratio(sums[:, 3], sums[:, 4]), _ratio(sums[:, 5], sums[:, 6])
        out.append(np.stack([sums[:, 0] / n, sums[:, 1] / n, sums[:, 2] / n, oiou_a, oiou_b, oiou_b - oiou_a],
                            axis=1))
    return np.concatenate(out)


def _permutation(a: Scores, b: Scores, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples + 1, 2): the mIoU and oIoU differences B - A with each expression's A and B swapped with
    probability 1/2; row 0 is the observed difference (nothing swapped), computed the same way."""
    n = len(a.iou)
    diff = b.iou - a.iou
    # Swapping expression i moves diff_i from B - A to A - B, and its counts from one side to the other.
    values = np.stack([diff, a.intersection - b.intersection, a.union - b.union], axis=1)
    totals = np.array([diff.sum(), a.intersection.sum(), a.union.sum(), b.intersection.sum(), b.union.sum()])

    def differences(swaps: np.ndarray) -> np.ndarray:
        moved = swaps @ values
        miou = (totals[0] - 2 * moved[:, 0]) / n
        oiou = (_ratio(totals[3] + moved[:, 1], totals[4] + moved[:, 2])
                - _ratio(totals[1] - moved[:, 1], totals[2] - moved[:, 2]))
        return np.stack([miou, oiou], axis=1)

    observed = differences(np.zeros((1, n)))
    # One random bit per expression and resample: bytes unpacked along the rows (8 swaps per random byte).
    draws = [differences(np.unpackbits(rng.integers(0, 256, size=(size, (n + 7) // 8), dtype=np.uint8), axis=1,
                                       count=n).astype(np.float64))
             for size in _chunks(resamples, n)]
    return np.concatenate([observed] + draws)


def _p_value(samples: np.ndarray) -> float:
    """Two-sided Monte-Carlo p-value; ``samples[0]`` is the observed statistic."""
    observed = abs(samples[0])
    # A relative tolerance keeps resamples equal to the observed value up to summation order counted as equal.
    hits = int(np.count_nonzero(np.abs(samples[1:]) >= observed - 1e-12 * max(observed, 1e-300)))
    return (1 + hits) / len(samples)


def _interval(samples: np.ndarray) -> List[float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_comparison(a: Scores, b: Scores, resamples: int = 10_000,
                      seed: Union[int, Sequence[int]] = 0) -> Dict[str, object]:
    """mIoU and oIoU of A, of B and of B - A with 95 % paired-bootstrap percentile intervals, and two-sided
    paired-permutation p-values for the differences.

    Returns ``{"n", "a": {"mIoU": {"value", "ci95"}, "oIoU": {...}}, "b": {...},
    "difference": {"mIoU": {"value", "ci95", "p_value"}, "oIoU": {...}}}`` (values as fractions). ``seed``
    seeds numpy's generator (an int or a list of ints): the same seed gives the same intervals and p-values.
    """
    n = len(a.iou)
    if n == 0 or len(b.iou) != n:
        raise ValueError(f"paired_comparison: {n} and {len(b.iou)} expressions (need the same number, > 0)")
    if resamples < 1:
        raise ValueError(f"paired_comparison: resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    boot = _bootstrap(a, b, resamples, rng)
    perm = _permutation(a, b, resamples, rng)
    values = {"a": (a.miou(), a.oiou()), "b": (b.miou(), b.oiou())}
    values["difference"] = (values["b"][0] - values["a"][0], values["b"][1] - values["a"][1])
    out: Dict[str, object] = {"n": n}
    for side, column in (("a", 0), ("b", 1), ("difference", 2)):
        out[side] = {metric: {"value": values[side][k], "ci95": _interval(boot[:, column + 3 * k])}
                     for k, metric in enumerate(("mIoU", "oIoU"))}
    for k, metric in enumerate(("mIoU", "oIoU")):
        out["difference"][metric]["p_value"] = _p_value(perm[:, k])
    return out


def compare_by_category(a: Scores, b: Scores, categories: Sequence[str], target: Sequence[bool],
                        resamples: int = 10_000, seed: int = 0) -> Dict[str, Dict[str, object]]:
    """:func:`paired_comparison` within each category, on the expressions that have a target (as
    ``cat/<name>/mIoU`` of metrics.json: a no-target expression borrows its category from another image).
    Category k (in sorted order) draws from the seed ``[seed, k + 1]``."""
    names = np.asarray(categories, dtype=object)
    has_target = np.asarray(target, dtype=bool)
    out = {}
    for k, name in enumerate(sorted(set(names[has_target].tolist()))):
        index = np.flatnonzero((names == name) & has_target)
        out[name] = paired_comparison(a.subset(index), b.subset(index), resamples, seed=[seed, k + 1])
    return out
