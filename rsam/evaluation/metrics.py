"""Referring-segmentation metrics computed from per-expression pixel statistics.

Every expression (one referring sentence on one image) is reduced on the device to a handful of integers:
true/false positives, false negatives and two flags (empty target, empty prediction). Everything else —
mIoU, oIoU, Pr@X, mDice, per-category and no-target metrics — is computed from these small tensors, so
distributed evaluation only gathers O(N) numbers and de-duplicates them by sample id (DistributedSampler pads
the last shard with repeated samples).

Two conventions are provided, because published numbers use both (docs/metrics.md compares the codebases).
``standard`` is the default everywhere (:data:`DEFAULT_CONVENTION`: trainer, ``training/eval.py``, configs):
the published RRSIS-D / RefSegRS / RISBench tables use it.

* ``official``: what the official RSAM meters compute (torchmetrics' legacy ``Dice`` stat scores): a pixel is
  foreground iff its *logit* >= 0.5 (no sigmoid), Pr@X counts IoU > X (strict), and an expression whose target
  and prediction are both empty scores IoU 0 and is a miss in every Pr@X.
* ``standard``: the LAVT / RMSIN / FIANet test scripts: foreground iff logit > 0 (sigmoid > 0.5, the argmax of a
  two-class head), Pr@X counts IoU >= X, empty union -> IoU 0.

In both, mIoU is the mean of per-expression IoU, oIoU (called cIoU by RSAM) is sum(I) / sum(U) over the set,
and mDice the mean of per-expression 2TP / (2TP + FP + FN). When the set contains expressions with an empty
target (no-target / negative expressions), the same numbers restricted to non-empty targets are reported under
``pos/``, together with the no-target accuracy ``N-acc``, the target accuracy ``T-acc`` and ``gIoU`` (mean IoU
where an empty prediction on an empty target scores 1, the GRES convention).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch

from rsam import distributed

__all__ = [
    "MetricConvention",
    "OFFICIAL",
    "STANDARD",
    "DEFAULT_CONVENTION",
    "expression_stats",
    "per_expression_iou",
    "compute_metrics",
    "gather_stats",
    "combine_metrics",
    "format_metrics",
    "format_metric_line",
    "format_metric_value",
    "MetricAccumulator",
]

Stats = Dict[str, torch.Tensor]
SampleId = Hashable

# Keys of a stats dict and their dtypes; any further (N,) tensor (e.g. is_negative) is carried along.
STAT_KEYS = {"tp": torch.int64, "fp": torch.int64, "fn": torch.int64, "gt_empty": torch.bool, "pred_empty": torch.bool}


@dataclass(frozen=True)
class MetricConvention:
    """How logits become masks and how per-expression IoUs become precision numbers.

    name:             label printed with the results
    threshold:        logit threshold of a foreground pixel
    inclusive:        foreground = logit >= threshold (True) or logit > threshold (False)
    precision_strict: Pr@X counts IoU > X (True) or IoU >= X (False)
    pr_thresholds:    the X of the Pr@X numbers
    """

    name: str
    threshold: float
    inclusive: bool
    precision_strict: bool
    pr_thresholds: Tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)

    def foreground(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool mask of foreground pixels, same shape as ``logits``."""
        return logits >= self.threshold if self.inclusive else logits > self.threshold

    def describe(self) -> str:
        fg = ">=" if self.inclusive else ">"
        pr = ">" if self.precision_strict else ">="
        return (f"metric convention '{self.name}': foreground = logit {fg} {self.threshold:g}; "
                f"Pr@X counts IoU {pr} X; empty target + empty prediction = IoU 0 and a Pr@X miss "
                f"(gIoU counts it 1); mIoU = mean per-expression IoU, oIoU (=cIoU) = sum I / sum U")

    @staticmethod
    def get(convention: Union[str, "MetricConvention"]) -> "MetricConvention":
        """Look up a convention by name (``official`` / ``standard``) or pass one through."""
        if isinstance(convention, MetricConvention):
            return convention
        try:
            return _CONVENTIONS[str(convention)]
        except KeyError:
            raise ValueError(f"unknown metric convention {convention!r}; expected one of "
                             f"{sorted(_CONVENTIONS)} or a MetricConvention") from None


OFFICIAL = MetricConvention("official", threshold=0.5, inclusive=True, precision_strict=True)
STANDARD = MetricConvention("standard", threshold=0.0, inclusive=False, precision_strict=False)
_CONVENTIONS = {c.name: c for c in (OFFICIAL, STANDARD)}
# The one default: the convention of the published tables. The trainer, training/eval.py and every argument
# default below use it; ``official`` is chosen explicitly (configs/rsam_b+_b_official.yaml, --convention).
DEFAULT_CONVENTION = STANDARD.name


# ----------------------------------------------------------------------------------------------------------
# Per-expression statistics (runs on the device, no host synchronisation)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def expression_stats(
    logits: torch.Tensor,
    gt: torch.Tensor,
    convention: Union[str, MetricConvention] = DEFAULT_CONVENTION,
    chunk_pixels: int = 1 << 26,
) -> Stats:
    """Pixel statistics of every expression.

    Args:
        logits: (N,1,H,W) or (N,H,W) mask logits (any float dtype, any device).
        gt: (N,H,W) bool ground truth on the same device.
        convention: decides which pixels are foreground.
        chunk_pixels: expressions are processed in chunks of about this many pixels to bound temporaries.
    Returns:
        dict of (N,) tensors on ``logits.device``: ``tp``, ``fp``, ``fn`` (int64; intersection = tp,
        union = tp + fp + fn), ``gt_empty``, ``pred_empty`` (bool).
    """
    convention = MetricConvention.get(convention)
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError(f"expression_stats: logits must be (N,1,H,W) or (N,H,W), got {tuple(logits.shape)}")
        logits = logits[:, 0]
    if logits.dim() != 3 or gt.shape != logits.shape:
        raise ValueError(f"expression_stats: logits {tuple(logits.shape)} and gt {tuple(gt.shape)} must both be "
                         f"(N,H,W) (logits may also be (N,1,H,W))")
    if gt.dtype != torch.bool:
        raise ValueError(f"expression_stats: gt must be a bool tensor, got {gt.dtype}")
    n, h, w = logits.shape
    chunk = max(1, chunk_pixels // max(1, h * w))
    tp, pred_count, gt_count = [], [], []
    for start in range(0, n, chunk):
        pred = convention.foreground(logits[start:start + chunk])
        target = gt[start:start + chunk]
        tp.append((pred & target).sum(dim=(1, 2), dtype=torch.int64))
        pred_count.append(pred.sum(dim=(1, 2), dtype=torch.int64))
        gt_count.append(target.sum(dim=(1, 2), dtype=torch.int64))
    if n == 0:
        return _empty_stats(logits.device)
    tp_, pred_, gt_ = torch.cat(tp), torch.cat(pred_count), torch.cat(gt_count)
    return {"tp": tp_, "fp": pred_ - tp_, "fn": gt_ - tp_, "gt_empty": gt_ == 0, "pred_empty": pred_ == 0}


def _empty_stats(device=None) -> Stats:
    return {k: torch.zeros(0, dtype=dt, device=device) for k, dt in STAT_KEYS.items()}


def _check_stats(stats: Stats, where: str) -> int:
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise KeyError(f"{where}: stats dict lacks {missing} (has {sorted(stats)})")
    n = stats["tp"].shape[0]
    for k, v in stats.items():
        if not isinstance(v, torch.Tensor) or v.shape != (n,):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{where}: stats['{k}'] must be a ({n},) tensor like stats['tp'], got {shape}")
    return n


def per_expression_iou(stats: Stats, empty_value: float = 0.0) -> torch.Tensor:
    """(N,) float64 IoU = tp / (tp + fp + fn); ``empty_value`` where the union is empty."""
    tp = stats["tp"].double()
    union = tp + stats["fp"].double() + stats["fn"].double()
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, empty_value))


# ----------------------------------------------------------------------------------------------------------
# Metrics (host side, float64 / exact sums)
# ----------------------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _pr_key(x: float) -> str:
    return f"Pr@{x:g}"


def _core_metrics(tp: List[int], fp: List[int], fn: List[int], convention: MetricConvention,
                  prefix: str = "") -> Dict[str, float]:
    """mIoU, oIoU, Pr@X, mDice of one set of expressions (python ints in, exact / correctly rounded sums)."""
    n = len(tp)
    union = [a + b + c for a, b, c in zip(tp, fp, fn)]
    iou = [_ratio(a, u) for a, u in zip(tp, union)]
    dice = [_ratio(2 * a, 2 * a + b + c) for a, b, c in zip(tp, fp, fn)]
    out = {
        f"{prefix}mIoU": math.fsum(iou) / n,
        f"{prefix}oIoU": _ratio(sum(tp), sum(union)),
    }
    for x in convention.pr_thresholds:
        # Exact rational comparison tp/union vs x, so the result never depends on float rounding. An empty
        # union is a miss in both conventions (IoU 0, or NaN in the official meter).
        q = Fraction(str(x))
        if convention.precision_strict:
            hits = sum(1 for a, u in zip(tp, union) if u > 0 and a * q.denominator > q.numerator * u)
        else:
            hits = sum(1 for a, u in zip(tp, union) if u > 0 and a * q.denominator >= q.numerator * u)
        out[prefix + _pr_key(x)] = hits / n
    out[f"{prefix}mDice"] = math.fsum(dice) / n
    return out


def compute_metrics(
    stats: Stats,
    convention: Union[str, MetricConvention] = DEFAULT_CONVENTION,
    categories: Optional[Sequence[str]] = None,
) -> Dict[str, float]:
    """All metrics of a set of expressions, computed once on the host.

    Args:
        stats: dict of (N,) tensors from :func:`expression_stats` (any device; gathered and de-duplicated
            already when evaluating distributed).
        convention: precision rule (the foreground threshold was applied when the stats were made).
        categories: N category names, for per-category mIoU.
    Returns:
        dict with ``mIoU``, ``oIoU``, ``Pr@0.5`` ... ``Pr@0.9``, ``mDice`` and ``num_expressions`` over all
        expressions; with categories ``cat/<name>/mIoU``, ``cat/<name>/count`` and the category-balanced
        ``mIoU_cat`` (on non-empty targets when there are empty ones); when some targets are empty also
        ``pos/<metric>`` on non-empty targets, ``N-acc``, ``T-acc``, ``gIoU``, ``num_no_target``.
    """
    convention = MetricConvention.get(convention)
    n = _check_stats(stats, "compute_metrics")
    if n == 0:
        raise ValueError("compute_metrics: no expressions to evaluate (empty stats)")
    if categories is not None and len(categories) != n:
        raise ValueError(f"compute_metrics: {len(categories)} categories for {n} expressions")
    tp, fp, fn = (stats[k].detach().cpu().tolist() for k in ("tp", "fp", "fn"))
    gt_empty = stats["gt_empty"].detach().cpu().tolist()
    pred_empty = stats["pred_empty"].detach().cpu().tolist()

    out: Dict[str, float] = {"num_expressions": n}
    out.update(_core_metrics(tp, fp, fn, convention))

    pos = [i for i in range(n) if not gt_empty[i]]
    num_empty = n - len(pos)
    if num_empty:
        out["num_no_target"] = num_empty
        if pos:
            out.update(_core_metrics([tp[i] for i in pos], [fp[i] for i in pos], [fn[i] for i in pos],
                                     convention, prefix="pos/"))
        out["N-acc"] = sum(1 for i in range(n) if gt_empty[i] and pred_empty[i]) / num_empty
        out["T-acc"] = _ratio(sum(1 for i in pos if not pred_empty[i]), len(pos))
        g = [1.0 if (gt_empty[i] and pred_empty[i]) else _ratio(tp[i], tp[i] + fp[i] + fn[i]) for i in range(n)]
        out["gIoU"] = math.fsum(g) / n

    if categories is not None:
        # Per category on the expressions that have a target: a no-target expression borrows its sentence
        # (and category) from another image, so it says nothing about how well that category is segmented.
        by_cat: Dict[str, List[float]] = {}
        for i in (pos if num_empty else range(n)):
            u = tp[i] + fp[i] + fn[i]
            by_cat.setdefault(str(categories[i]), []).append(_ratio(tp[i], u))
        for name in sorted(by_cat):
            out[f"cat/{name}/mIoU"] = math.fsum(by_cat[name]) / len(by_cat[name])
            out[f"cat/{name}/count"] = len(by_cat[name])
        if by_cat:
            out["mIoU_cat"] = math.fsum(out[f"cat/{c}/mIoU"] for c in sorted(by_cat)) / len(by_cat)
    return out


PERCENT_NOTE = "rates in % (metrics.json keeps fractions), counts as integers"


def format_metric_value(value: Union[int, float]) -> str:
    """One metric as people read it (as RRSIS papers print them): a rate as a percentage with 2 decimals
    ("67.12 %"), a count as an integer. Every printed or logged table uses this; JSON keeps fractions."""
    return f"{100 * value:.2f} %" if isinstance(value, float) else f"{value:d}"


def format_metrics(metrics: Dict[str, float], convention: Union[str, MetricConvention] = DEFAULT_CONVENTION) -> str:
    """Human-readable table; the first line states the convention the numbers follow, the second the unit."""
    convention = MetricConvention.get(convention)
    lines = [convention.describe(), PERCENT_NOTE]
    width = max((len(k) for k in metrics), default=0)
    for k, v in metrics.items():
        lines.append(f"  {k:<{width}}  {format_metric_value(v):>10}")
    return "\n".join(lines)


def format_metric_line(metrics: Dict[str, float], keys: Sequence[str]) -> str:
    """One log line of ``keys`` (those present), e.g. ``"mIoU 67.12 %  oIoU 70.03 %"``, as :func:`format_metrics`."""
    return "  ".join(f"{k} {format_metric_value(metrics[k])}" for k in keys if k in metrics)


# ----------------------------------------------------------------------------------------------------------
# Distributed gathering
# ----------------------------------------------------------------------------------------------------------
def _hashable(sid):
    # Sample ids arrive as tuples from the dataset but as lists after a JSON round trip.
    return tuple(_hashable(s) for s in sid) if isinstance(sid, (list, tuple)) else sid


def _sort_order(ids: List[SampleId]) -> List[int]:
    try:
        return sorted(range(len(ids)), key=lambda i: ids[i])
    except TypeError:  # mixed id types: any fixed order works, it only has to be rank-independent
        return sorted(range(len(ids)), key=lambda i: repr(ids[i]))


def gather_stats(
    stats: Stats,
    sample_ids: Sequence[SampleId],
    categories: Optional[Sequence[str]] = None,
    group=None,
) -> Tuple[Stats, List[SampleId], Optional[List[str]]]:
    """Gather per-expression stats from all ranks, keep every sample id once, sort by sample id.

    Every rank gets the same result. Sorting makes the expression order — and therefore every floating-point
    sum — independent of how the set was sharded, so 1 and k processes give bit-identical metrics. When a
    sample id occurs more than once (DistributedSampler padding), the copy from the lowest rank is kept.

    Args:
        stats: dict of (n_r,) tensors on this rank (any device); all ranks must have the same keys.
        sample_ids: n_r hashable ids (e.g. (image name, annotation index)).
        categories: optional n_r category names.
        group: process group (default: the world), ignored without an initialised process group.
    Returns:
        (stats on the CPU, sample ids, categories or None), de-duplicated and sorted.
    """
    n = _check_stats(stats, "gather_stats")
    ids = [_hashable(s) for s in sample_ids]
    if len(ids) != n:
        raise ValueError(f"gather_stats: {len(ids)} sample ids for {n} expressions")
    if categories is not None and len(categories) != n:
        raise ValueError(f"gather_stats: {len(categories)} categories for {n} expressions")
    local = ({k: v.detach().cpu() for k, v in stats.items()}, ids, None if categories is None else list(categories))

    parts = distributed.all_gather_object(local, group=group)

    keys = sorted(parts[0][0])
    with_cats = any(p[2] is not None for p in parts)
    for r, (s, i, c) in enumerate(parts):
        if sorted(s) != keys:
            raise ValueError(f"gather_stats: rank {r} has stats keys {sorted(s)}, rank 0 has {keys}")
        if with_cats and c is None and len(i) > 0:
            raise ValueError(f"gather_stats: categories given on some ranks but not on rank {r}")
    all_stats = {k: torch.cat([p[0][k] for p in parts]) for k in keys}
    all_ids = [sid for p in parts for sid in p[1]]
    # A rank that saw no expression has no categories to give; it contributes nothing either way.
    all_cats = [c for p in parts for c in (p[2] or [])] if with_cats else None

    first: Dict[SampleId, int] = {}
    for i, sid in enumerate(all_ids):
        first.setdefault(sid, i)
    unique = list(first.values())
    order = [unique[j] for j in _sort_order([all_ids[i] for i in unique])]
    index = torch.tensor(order, dtype=torch.long)
    out_stats = {k: v[index] for k, v in all_stats.items()}
    out_ids = [all_ids[i] for i in order]
    out_cats = None if all_cats is None else [all_cats[i] for i in order]
    return out_stats, out_ids, out_cats


# ----------------------------------------------------------------------------------------------------------
# Accumulator used by the evaluation loop
# ----------------------------------------------------------------------------------------------------------
class MetricAccumulator:
    """Collects per-expression stats batch by batch; ``compute()`` gathers over ranks and computes once.

    ``update`` only launches device kernels (no host sync); ``compute`` must be called on every rank (it is
    a collective) and returns the same dict everywhere.

    Example::

        acc = MetricAccumulator("standard")
        for batch in loader:
            out = model(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
            acc.update(out.logits, batch.masks, batch.sample_ids, batch.categories, batch.is_negative)
        metrics = acc.compute()
        print(format_metrics(metrics, acc.convention))
    """

    def __init__(self, convention: Union[str, MetricConvention] = DEFAULT_CONVENTION, group=None):
        self.convention = MetricConvention.get(convention)
        self.group = group
        self.reset()

    def reset(self) -> None:
        self._stats: List[Stats] = []
        self._ids: List[SampleId] = []
        self._cats: Optional[List[str]] = None
        self._has_cats: Optional[bool] = None

    def update(
        self,
        logits: torch.Tensor,
        gt: torch.Tensor,
        sample_ids: Sequence[SampleId],
        categories: Optional[Sequence[str]] = None,
        is_negative: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one batch: logits (N,1,H,W) or (N,H,W), gt (N,H,W) bool, N sample ids, N categories,
        is_negative (N,) bool (default: all False)."""
        stats = expression_stats(logits, gt, self.convention)
        n = stats["tp"].shape[0]
        if len(sample_ids) != n:
            raise ValueError(f"MetricAccumulator.update: {len(sample_ids)} sample_ids for {n} expressions")
        if is_negative is None:
            is_negative = torch.zeros(n, dtype=torch.bool, device=stats["tp"].device)
        elif is_negative.shape != (n,):
            raise ValueError(f"MetricAccumulator.update: is_negative must be ({n},), got {tuple(is_negative.shape)}")
        stats["is_negative"] = is_negative.to(device=stats["tp"].device, dtype=torch.bool, non_blocking=True)
        has_cats = categories is not None
        if self._has_cats is not None and has_cats != self._has_cats:
            raise ValueError("MetricAccumulator.update: pass categories with every batch or with none")
        if has_cats and len(categories) != n:
            raise ValueError(f"MetricAccumulator.update: {len(categories)} categories for {n} expressions")
        self._has_cats = has_cats
        self._stats.append(stats)
        self._ids.extend(sample_ids)
        if has_cats:
            if self._cats is None:
                self._cats = []
            self._cats.extend(categories)

    def local_stats(self) -> Stats:
        """This rank's stats so far, concatenated (on the device)."""
        if not self._stats:
            out = _empty_stats()
            out["is_negative"] = torch.zeros(0, dtype=torch.bool)
            return out
        return {k: torch.cat([s[k] for s in self._stats]) for k in self._stats[0]}

    def gather(self) -> Tuple[Stats, List[SampleId], Optional[List[str]]]:
        """Collective: stats, sample ids and categories of all ranks, de-duplicated and sorted by sample id."""
        cats = self._cats if self._has_cats else None
        return gather_stats(self.local_stats(), self._ids, cats, group=self.group)

    def compute(self) -> Dict[str, float]:
        """Collective: gather, then compute every metric (identical on all ranks)."""
        stats, _, cats = self.gather()
        metrics = compute_metrics(stats, self.convention, cats)
        neg = stats["is_negative"]
        metrics["num_negative"] = int(neg.sum())
        bad = int((neg & ~stats["gt_empty"]).sum())
        if bad:
            warnings.warn(f"MetricAccumulator: {bad} expression(s) flagged is_negative have a non-empty ground "
                          f"truth mask; no-target metrics use the masks (gt_empty), not the flag")
        return metrics


def combine_metrics(per_dataset: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Metrics of several evaluation datasets in one dict: ``<name>/<metric>`` for each, and under the plain
    metric name the mean over datasets (each dataset weighs the same; counts, ``num_*``, are totals).
    One dataset named ``""`` passes through unchanged."""
    if list(per_dataset) == [""]:
        return dict(per_dataset[""])
    out: Dict[str, float] = {}
    for name, metrics in per_dataset.items():
        out.update({f"{name}/{k}": v for k, v in metrics.items()})
    shared = set.intersection(*(set(m) for m in per_dataset.values()))
    for key in sorted(k for k in shared if not k.startswith("cat/")):
        values = [m[key] for m in per_dataset.values()]
        out[key] = sum(values) if key.startswith("num_") else math.fsum(values) / len(values)
    return out
