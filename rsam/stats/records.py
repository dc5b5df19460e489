"""The ``per_expression.jsonl`` format: one JSON object per scored expression, written beside ``metrics.json`` by
``training/eval.py`` and the trainer's test, read by ``rsam-compare``. No torch: reading it is cheap.

    {"id": "risors/P0001_3/ann2", "dataset": "risors", "image": "P0001_3", "category": "ship",
     "intersection": 812, "union": 1040, "target": true, "predicted_target": true,
     "convention": "standard", "resolution": "network"}

``intersection`` / ``union`` are pixels under the run's convention and resolution, so mIoU (the mean of
intersection / union, 0 where the union is empty) and oIoU (sum of intersections / sum of unions) recomputed
from the file equal ``metrics.json`` exactly. ``id`` is stable across runs and models: dataset, image and the
expression's annotation index (``neg<j>`` for the j-th drawn no-target expression of the image), which is what
``rsam-compare`` pairs two evaluations by. ``target``: the expression has an object; ``predicted_target``: the
prediction is not empty.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from rsam.atomic_files import atomic_path
from rsam.errors import UserError

__all__ = ["PER_EXPRESSION_JSONL", "PerExpressionFile", "expression_id", "expression_records", "write_records",
           "read_per_expression"]

PER_EXPRESSION_JSONL = "per_expression.jsonl"
REQUIRED_FIELDS = ("id", "intersection", "union")  # the others default (hand-made files may omit them)


def expression_id(dataset: str, sample_id: Tuple[str, int]) -> str:
    """``<dataset>/<image>/ann<k>`` for annotation k, ``<dataset>/<image>/neg<j>`` for a drawn no-target one."""
    name, aid = sample_id
    expr = f"ann{aid}" if aid >= 0 else f"neg{-1 - aid}"
    return f"{dataset}/{name}/{expr}" if dataset else f"{name}/{expr}"


def expression_records(dataset: str, sample_ids: Sequence[Tuple[str, int]], categories: Sequence[str],
                       tp: Sequence[int], fp: Sequence[int], fn: Sequence[int], gt_empty: Sequence[bool],
                       pred_empty: Sequence[bool], convention: str, resolution: str) -> Iterable[dict]:
    """The records of one dataset's expressions, from their pixel statistics (plain lists)."""
    for i, sid in enumerate(sample_ids):
        yield {"id": expression_id(dataset, sid), "dataset": dataset, "image": sid[0], "category": categories[i],
               "intersection": tp[i], "union": tp[i] + fp[i] + fn[i], "target": not gt_empty[i],
               "predicted_target": not pred_empty[i], "convention": convention, "resolution": resolution}


def write_records(path: str, records: Iterable[dict]) -> str:
    """Write ``records`` as JSON lines to ``path``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return path


@dataclass
class PerExpressionFile:
    """A read ``per_expression.jsonl``: one entry per expression, in file order."""

    path: str
    ids: List[str]
    datasets: List[str]
    categories: List[str]
    intersection: List[int]
    union: List[int]
    target: List[bool]
    convention: Optional[str]
    resolution: Optional[str]

    def __len__(self) -> int:
        return len(self.ids)


def read_per_expression(path: str) -> PerExpressionFile:
    """Read an evaluation folder's ``per_expression.jsonl`` (or the file itself); every problem is a
    :class:`UserError` naming the file and line.

    Only ``id``, ``intersection`` and ``union`` are required: ``dataset`` and ``category`` default to "",
    ``target`` to true; a file without
    ``convention`` / ``resolution`` takes them from the ``metrics.json`` beside it, if any.
    """
    file = os.path.join(path, PER_EXPRESSION_JSONL) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"{file}: not found (an evaluation folder written by training/eval.py or the trainer's "
                        f"test, or its {PER_EXPRESSION_JSONL})")
    out = PerExpressionFile(file, [], [], [], [], [], [], None, None)
    seen = set()
    settings = set()
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse_line(file, number, line)
            if record["id"] in seen:
                raise UserError(f"{file}:{number}: id {record['id']!r} occurs twice")
            seen.add(record["id"])
            settings.add((record.get("convention"), record.get("resolution")))
            out.ids.append(record["id"])
            out.datasets.append(str(record.get("dataset", "")))
            out.categories.append(str(record.get("category", "")))
            out.intersection.append(record["intersection"])
            out.union.append(record["union"])
            out.target.append(bool(record.get("target", True)))
    if not out.ids:
        raise UserError(f"{file}: no expressions")
    if len(settings) > 1:
        raise UserError(f"{file}: records under several conventions / resolutions {sorted(settings, key=str)}")
    out.convention, out.resolution = settings.pop()
    if out.convention is None:
        out.convention, out.resolution = _settings_beside(file)
    return out


def _settings_beside(file: str) -> Tuple[Optional[str], Optional[str]]:
    """(convention, resolution) recorded in the ``metrics.json`` next to ``file``, or (None, None)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(file)), "metrics.json")
    try:
        with open(beside, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, None
    return (record.get("convention"), record.get("resolution")) if isinstance(record, dict) else (None, None)


def _is_count(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _parse_line(file: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}:{number}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{file}:{number}: not a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise UserError(f"{file}:{number}: missing {missing}")
    if not isinstance(record["id"], str) or not record["id"]:
        raise UserError(f"{file}:{number}: id must be a non-empty string, got {record['id']!r}")
    i, u = record["intersection"], record["union"]
    if not (_is_count(i) and _is_count(u) and i <= u):
        raise UserError(f"{file}:{number}: intersection and union must be pixel counts with 0 <= intersection <= "
                        f"union, got {i!r} and {u!r}")
    return record
