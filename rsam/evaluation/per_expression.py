"""Per-expression results of an evaluation: collected batch by batch, gathered over ranks, written to
``per_expression.jsonl`` (the format: :mod:`rsam.stats.records`).

The evaluation engine reduces every expression to pixel statistics once (:func:`rsam.evaluation.metrics.
expression_stats`); :class:`ExpressionCollector` keeps them, :meth:`ExpressionCollector.gather` joins every
rank's share (de-duplicated and sorted by sample id, as :func:`rsam.evaluation.metrics.gather_stats` does) into
an :class:`ExpressionTable`, and the table's :meth:`ExpressionTable.metrics` are the numbers of ``metrics.json``;
:func:`write_per_expression` writes the same table, so the file and the metrics agree exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from rsam.evaluation.metrics import MetricConvention, compute_metrics, gather_stats
from rsam.stats.records import expression_records, write_records

__all__ = ["ExpressionCollector", "ExpressionTable", "dataset_label", "write_per_expression"]


def dataset_label(name: str, dataset) -> str:
    """What a dataset's expressions are filed under: its name in a multi-dataset split (``data.test.rrsisd``:
    ``rrsisd``), else its format (``risors``). Not its folder, so a copy of the data elsewhere (or with its
    texts shuffled, as training/demo.py's control) keeps the same ids."""
    return name or str(getattr(dataset, "format", ""))


@dataclass
class ExpressionTable:
    """Every expression of an evaluation once, sorted by sample id (identical on every rank).

    stats: (N,) CPU tensors ``tp``, ``fp``, ``fn``, ``gt_empty``, ``pred_empty``, ``is_negative``.
    """

    sample_ids: List[Tuple[str, int]]
    categories: Optional[List[str]]
    stats: Dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def metrics(self, convention: MetricConvention) -> Dict[str, float]:
        """Every metric of the set (:func:`rsam.evaluation.metrics.compute_metrics`) and ``num_negative``."""
        metrics = compute_metrics(self.stats, convention, self.categories)
        negative = self.stats["is_negative"]
        metrics["num_negative"] = int(negative.sum())
        bad = int((negative & ~self.stats["gt_empty"]).sum())
        if bad:
            warnings.warn(f"{bad} expression(s) flagged is_negative have a non-empty ground truth mask; "
                          "no-target metrics use the masks (gt_empty), not the flag")
        return metrics


class ExpressionCollector:
    """This rank's per-expression statistics, batch by batch (device tensors: no host sync until gather)."""

    def __init__(self) -> None:
        self._stats: List[Dict[str, torch.Tensor]] = []
        self._ids: List[Hashable] = []
        self._categories: List[str] = []

    def add(self, stats: Dict[str, torch.Tensor], sample_ids: Sequence[Hashable], categories: Sequence[str],
            is_negative: torch.Tensor) -> None:
        """One group of expressions: their :func:`expression_stats`, ids, categories and no-target flags."""
        n = stats["tp"].shape[0]
        if len(sample_ids) != n or len(categories) != n or is_negative.shape != (n,):
            raise ValueError(f"ExpressionCollector.add: {n} stats, {len(sample_ids)} ids, {len(categories)} "
                             f"categories, is_negative {tuple(is_negative.shape)}")
        flags = is_negative.to(device=stats["tp"].device, dtype=torch.bool, non_blocking=True)
        self._stats.append({**stats, "is_negative": flags})
        self._ids.extend(sample_ids)
        self._categories.extend(categories)

    def gather(self, group=None) -> ExpressionTable:
        """Collective: every rank's expressions, each sample id once, sorted (the same table on every rank)."""
        if self._stats:
            local = {k: torch.cat([s[k] for s in self._stats]) for k in self._stats[0]}
        else:  # a rank whose shard had no image still takes part in the gather
            local = {k: torch.zeros(0, dtype=torch.int64 if k in ("tp", "fp", "fn") else torch.bool)
                     for k in ("tp", "fp", "fn", "gt_empty", "pred_empty", "is_negative")}
        stats, ids, categories = gather_stats(local, self._ids, self._categories, group=group)
        return ExpressionTable([tuple(i) for i in ids], categories, stats)


def write_per_expression(path: str, tables: Dict[str, ExpressionTable], convention: str,
                         resolution: str) -> str:
    """Write ``per_expression.jsonl`` (atomically): the tables of every dataset, ``{dataset name: table}``."""

    def records():
        for dataset, table in tables.items():
            stats = {k: table.stats[k].tolist() for k in ("tp", "fp", "fn", "gt_empty", "pred_empty")}
            yield from expression_records(dataset, table.sample_ids, table.categories or [""] * len(table),
                                          **stats, convention=convention, resolution=resolution)

    return write_records(path, records())
