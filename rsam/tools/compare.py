"""rsam-compare: is model B better than model A on this benchmark, and by how much, give or take?

    rsam-compare eval_A/ eval_B/                           # mIoU / oIoU of A, B, B - A with 95 % intervals, p-values
    rsam-compare eval_A/per_expression.jsonl eval_B/ --json --resamples 20000 --seed 1
    rsam-compare --table runs/base/seed1 runs/base/seed2 runs/lora/seed1 runs/lora/seed2 [--format csv|latex]

A and B are evaluation folders written by ``training/eval.py`` or the trainer's test (or their
``per_expression.jsonl``). Expressions are paired by id; both must hold the same ids under the same convention
and resolution. The statistics are :mod:`rsam.stats.paired` (paired bootstrap percentile intervals,
paired permutation p-values, per category too), the seed table :mod:`rsam.stats.seed_table`;
docs/metrics.md says how to read them. Exit status: 0, or 2 with one line for unusable input.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional

from rsam.cli import run_command
from rsam.errors import UserError
from rsam.stats.paired import Scores, compare_by_category, paired_comparison
from rsam.stats.records import PerExpressionFile, read_per_expression
from rsam.stats.seed_table import FORMATS, render, seed_table

__all__ = ["compare_files", "format_comparison", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsam-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="A B (evaluation folders or per_expression.jsonl files); with --table: RUN folders")
    p.add_argument("--table", action="store_true",
                   help="mean +- std over seeds per config and benchmark, and paired comparisons between configs")
    p.add_argument("--format", choices=FORMATS, default="markdown", help="--table output format")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples and permutations (10000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same output)")
    args = p.parse_args(argv)
    if args.resamples < 1:
        p.error("--resamples must be >= 1")
    if not args.table and len(args.paths) != 2:
        p.error(f"expected two evaluations A B, got {len(args.paths)} paths (several runs: --table)")
    return args


def _paired(a: PerExpressionFile, b: PerExpressionFile):
    """B's rows in A's order; a different id set or scoring rule is a UserError."""
    if (a.convention, a.resolution) != (b.convention, b.resolution):
        raise UserError(f"{a.path} was scored under convention {a.convention!r} at resolution {a.resolution!r}, "
                        f"{b.path} under {b.convention!r} at {b.resolution!r}: the numbers are not comparable")
    where = {i: k for k, i in enumerate(b.ids)}
    only_a = [i for i in a.ids if i not in where]
    if only_a or len(a.ids) != len(b.ids):
        only_b = sorted(set(b.ids) - set(a.ids))
        example = (only_a or only_b)[0]
        raise UserError(f"{a.path} and {b.path} hold different expressions: {len(only_a)} only in A, {len(only_b)} "
                        f"only in B (e.g. {example!r})")
    return [where[i] for i in a.ids]


def compare_files(a: PerExpressionFile, b: PerExpressionFile, resamples: int = 10_000,
                  seed: int = 0) -> Dict[str, object]:
    """The ``--json`` object: ``{"n", "a", "b", "difference", "categories": {name: {"n", "a", "b",
    "difference"}}}``, the overall and per-category paired comparison of two evaluations."""
    order = _paired(a, b)
    scores_a = Scores.from_counts(a.intersection, a.union)
    scores_b = Scores.from_counts([b.intersection[k] for k in order], [b.union[k] for k in order])
    result = paired_comparison(scores_a, scores_b, resamples, seed)
    result["categories"] = compare_by_category(scores_a, scores_b, a.categories, a.target, resamples, seed)
    return result


def _cell(entry: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    lo, hi = entry["ci95"]
    return f"{100 * entry['value']:{sign}7.2f} [{100 * lo:{sign}.2f}, {100 * hi:{sign}.2f}]"


def _lines(name: str, result: dict) -> list:
    lines = []
    for metric in ("mIoU", "oIoU"):
        d = result["difference"][metric]
        lines.append(f"{name:<24} {metric:<5} {_cell(result['a'][metric]):>24} {_cell(result['b'][metric]):>24} "
                     f"{_cell(d, signed=True):>26}  {d['p_value']:.4f}")
    return lines


def format_comparison(result: Dict[str, object], a: PerExpressionFile, b: PerExpressionFile, resamples: int,
                      seed: int) -> str:
    """The text form of :func:`compare_files`' result: percentages, with the convention and procedure named."""
    lines = [f"A = {a.path}", f"B = {b.path}",
             f"{result['n']} paired expressions; metric convention '{a.convention or 'unknown'}', "
             f"{a.resolution or 'unknown'} resolution; values in %, [95 % paired-bootstrap percentile interval, "
             f"{resamples} resamples of the expressions], p = two-sided paired permutation test ({resamples} "
             f"permutations), seed {seed}",
             f"{'':<24} {'':<5} {'A':>24} {'B':>24} {'B - A':>26}  p"]
    lines += _lines("all", result)
    for name, cat in result["categories"].items():
        lines += _lines(f"{name} (n={cat['n']})", cat)
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> Optional[int]:
    if args.table:
        table = seed_table(args.paths, args.resamples, args.seed)
        print(json.dumps(table) if args.json else render(table, args.format))
        return 0
    a, b = read_per_expression(args.paths[0]), read_per_expression(args.paths[1])
    result = compare_files(a, b, args.resamples, args.seed)
    print(json.dumps(result) if args.json else format_comparison(result, a, b, args.resamples, args.seed))
    return 0


def main(argv=None) -> int:
    """Console entry point (``rsam-compare``)."""
    return run_command("rsam-compare", lambda: compare(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
