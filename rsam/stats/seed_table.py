"""Seed sweeps: mean +- std over seeds per config and benchmark, and paired comparisons of seed-averaged configs.

A run is a training folder (``training/train.py --seeds 1,2,3`` writes ``<log dir>/seed<k>/``, and the trainer's
test writes ``eval_<split>/`` in it) or an evaluation folder (``per_expression.jsonl`` + ``metrics.json``).
Runs belong to one config when their label is the same: the folder's name, or its parent's name for a
``seed<k>`` folder. Benchmarks are the ``dataset`` field of ``per_expression.jsonl`` (one per dataset of a
mixed run). With several configs, each one after the first is compared with the first on every benchmark they
share: per expression the IoU, intersection and union are averaged over the config's seeds, then
:func:`rsam.stats.paired.paired_comparison` runs on the two averages.
"""
from __future__ import annotations

import glob
import json
import os
import re
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from rsam.errors import UserError
from rsam.stats.paired import Scores, paired_comparison
from rsam.stats.records import PER_EXPRESSION_JSONL, PerExpressionFile, read_per_expression

__all__ = ["FORMATS", "Run", "load_run", "seed_table", "render"]

FORMATS = ("markdown", "csv", "latex")
SEED_FOLDER = re.compile(r"^seed[_-]?(\d+)$")


@dataclass
class Run:
    """One evaluated run: its config label, seed (None if unknown), folder and per-expression results."""

    label: str
    seed: Optional[int]
    folder: str
    results: PerExpressionFile

    def benchmark(self, name: str) -> Tuple[List[str], Scores]:
        """Sorted ids and their scores on one benchmark (a ``dataset`` of the file)."""
        rows = sorted((i for i, d in enumerate(self.results.datasets) if d == name), key=self.results.ids.__getitem__)
        ids = [self.results.ids[i] for i in rows]
        scores = Scores.from_counts([self.results.intersection[i] for i in rows],
                                    [self.results.union[i] for i in rows])
        return ids, scores


def _eval_folder(path: str) -> str:
    """``path`` itself when it holds per_expression.jsonl, else its single ``eval_*`` folder that does."""
    if os.path.isfile(os.path.join(path, PER_EXPRESSION_JSONL)) or os.path.isfile(path):
        return path
    pattern = os.path.join(glob.escape(path), "eval_*", PER_EXPRESSION_JSONL)
    found = sorted(os.path.dirname(p) for p in glob.glob(pattern))
    if len(found) != 1:
        raise UserError(f"{path}: expected {PER_EXPRESSION_JSONL} in it or in exactly one eval_* folder, found "
                        f"{len(found)}{': ' + ', '.join(found) if found else ''}")
    return found[0]


def load_run(path: str) -> Run:
    """Read the run at ``path``; its seed comes from the evaluation's metrics.json, else the folder name."""
    folder = os.path.normpath(os.path.abspath(path))
    name = os.path.basename(folder)
    match = SEED_FOLDER.match(name)
    label = os.path.basename(os.path.dirname(folder)) if match else name
    evaluated = _eval_folder(folder)
    seed = _recorded_seed(evaluated)
    if seed is None and match:
        seed = int(match.group(1))
    return Run(label, seed, folder, read_per_expression(evaluated))


def _recorded_seed(folder: str) -> Optional[int]:
    try:
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
            seed = json.load(f).get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    return int(seed) if isinstance(seed, int) else None


def _mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _benchmarks(runs: Sequence[Run]) -> List[str]:
    return sorted(set.intersection(*(set(r.results.datasets) for r in runs)))


def _averaged(runs: Sequence[Run], benchmark: str) -> Tuple[List[str], Scores]:
    ids, scores = runs[0].benchmark(benchmark)
    per_run = [scores]
    for run in runs[1:]:
        other_ids, other = run.benchmark(benchmark)
        if other_ids != ids:
            raise UserError(f"{run.folder}: its {benchmark!r} expressions differ from those of {runs[0].folder}")
        per_run.append(other)
    return ids, Scores.mean_of(per_run)


def seed_table(paths: Sequence[str], resamples: int = 10_000, seed: int = 0) -> Dict[str, list]:
    """``{"rows": [...], "comparisons": [...]}``: per config and benchmark the seeds and mean / std of mIoU and
    oIoU over them; per other config and shared benchmark its paired comparison with the first config."""
    runs = [load_run(p) for p in paths]
    settings = {(r.results.convention, r.results.resolution) for r in runs}
    if len(settings) > 1:
        raise UserError(f"the runs were scored under different conventions / resolutions: {sorted(settings, key=str)}")
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    rows = []
    for label, members in groups.items():
        for benchmark in _benchmarks(members):
            scores = [m.benchmark(benchmark)[1] for m in members]
            miou, oiou = _mean_std([s.miou() for s in scores]), _mean_std([s.oiou() for s in scores])
            rows.append({"config": label, "benchmark": benchmark, "seeds": [m.seed for m in members],
                         "n": len(scores[0].iou), "mIoU": miou, "oIoU": oiou})
    comparisons = []
    labels = list(groups)
    for label in labels[1:]:
        for benchmark in _benchmarks(groups[labels[0]] + groups[label]):
            ids_a, a = _averaged(groups[labels[0]], benchmark)
            ids_b, b = _averaged(groups[label], benchmark)
            if ids_a != ids_b:
                raise UserError(f"{label} and {labels[0]} scored different {benchmark!r} expressions")
            comparisons.append({"config_a": labels[0], "config_b": label, "benchmark": benchmark,
                                **paired_comparison(a, b, resamples, seed)})
    convention, resolution = settings.pop()
    return {"rows": rows, "comparisons": comparisons, "convention": convention, "resolution": resolution}


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _cells(fmt: str, table: Dict[str, list]) -> Tuple[List[List[str]], List[List[str]]]:
    pm = r" $\pm$ " if fmt == "latex" else " ± "
    head = ["config", "benchmark", "seeds", "n", "mIoU (%)", "oIoU (%)"]
    if fmt == "csv":
        head = ["config", "benchmark", "seeds", "n", "mIoU_mean", "mIoU_std", "oIoU_mean", "oIoU_std"]
    rows = [head]
    for r in table["rows"]:
        seeds = " ".join("?" if s is None else str(s) for s in r["seeds"])
        stats = []
        for mean, std in (r["mIoU"], r["oIoU"]):
            if fmt == "csv":
                stats += [_pct(mean), "" if std is None else _pct(std)]
            else:
                stats.append(_pct(mean) + ("" if std is None else pm + _pct(std)))
        rows.append([r["config"], r["benchmark"], seeds, str(r["n"]), *stats])
    diff = [["B", "A", "benchmark", "n", "mIoU B - A (%)", "95% CI", "p", "oIoU B - A (%)", "95% CI", "p"]]
    for c in table["comparisons"]:
        cells = [c["config_b"], c["config_a"], c["benchmark"], str(c["n"])]
        for metric in ("mIoU", "oIoU"):
            d = c["difference"][metric]
            lo, hi = d["ci95"]
            cells += [f"{100 * d['value']:+.2f}", f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", f"{d['p_value']:.4f}"]
        diff.append(cells)
    return rows, diff if len(diff) > 1 else []


def _render_one(fmt: str, rows: List[List[str]]) -> str:
    if fmt == "csv":
        return "\n".join(",".join(f'"{c}"' if "," in c else c for c in row) for row in rows)
    if fmt == "latex":
        escaped = [[c.replace("_", r"\_").replace("%", r"\%") for c in row] for row in rows]
        body = [" & ".join(escaped[0]) + r" \\", r"\midrule"] + [" & ".join(r) + r" \\" for r in escaped[1:]]
        return "\n".join([r"\begin{tabular}{" + "l" * len(rows[0]) + "}", r"\toprule", *body, r"\bottomrule",
                          r"\end{tabular}"])
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def render(table: Dict[str, list], fmt: str = "markdown") -> str:
    """The table (and the comparisons, if any) as markdown, CSV or a LaTeX tabular (booktabs rules)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {FORMATS}, got {fmt!r}")
    rows, diff = _cells(fmt, table)
    caption = (f"metric convention '{table['convention'] or 'unknown'}', {table['resolution'] or 'unknown'} "
               "resolution; mean ± std over seeds; comparisons: seed-averaged per-expression scores, 95 % paired "
               "bootstrap interval, two-sided paired permutation p")
    parts = [_render_one(fmt, rows)]
    if fmt != "csv":
        parts.insert(0, ("% " + caption.replace("±", r"$\pm$")) if fmt == "latex" else caption)
    if diff:
        parts.append(_render_one(fmt, diff))
    return "\n\n".join(parts)
