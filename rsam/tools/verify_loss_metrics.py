"""Check our loss and metrics against a golden file made with the official RSAM code.

    python -m rsam.tools.verify_loss_metrics tests/reference/golden_loss_metrics.pt

Recomputes every stored loss term, per-expression loss term, metric (official convention) and per-expression
pixel statistic from the stored inputs and prints one row per number; exits with status 1 if any row fails.
``python -m rsam.tools.verify_reference FILE`` dispatches here for files with ``loss`` / ``metrics`` keys.
"""
from __future__ import annotations

import argparse
import math
import sys
from types import SimpleNamespace
from typing import List, Sequence, Tuple

import torch

from rsam.checkpoint import CheckpointError, read_torch_file
from rsam.evaluation.metrics import OFFICIAL, compute_metrics, expression_stats, per_expression_iou

Row = Tuple[str, float, float, float, float, str]

LOSS_REL_TOL = 1e-5      # float32 sums in a different order: ~1e-7 relative
LOSS_ABS_FLOOR = 1e-7    # for terms that are exactly 0 (e.g. the dice of an empty/empty expression)
METRIC_TOL = 1e-6        # the reference meters work in float32, we in float64

# golden `loss_per_expression` key -> our per-expression key
PER_EXPRESSION_KEYS = {"focal": "focal", "dice": "dice", "iou_l1": "iou", "class_bce": "class",
                       "target_obj": "target_obj", "actual_iou_gt0": "actual_iou"}


def _official_metric_name(key: str) -> str:
    """Official meter name (``iou/mIoU``, ``iou/cIoU``, ``dice/mDice``, ``precision/P@5``) -> ours."""
    name = key.split("/")[-1]
    if name == "cIoU":
        return "oIoU"
    if name.startswith("P@"):
        return f"Pr@{int(name[2:]) / 10:g}"
    return name


def _row(name: str, ours: float, ref: float, tol: float) -> Row:
    if math.isnan(ref):
        err, ok = (0.0, True) if math.isnan(ours) else (math.inf, False)
    else:
        err = abs(ours - ref)
        ok = err <= tol
    return (name, ours, ref, err, tol, "PASS" if ok else "FAIL")


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        have = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise KeyError(f"golden file: {where} has no key '{key}' (has {have})")
    return d[key]


def check_loss_metrics(golden: dict) -> Tuple[List[Row], bool]:
    """Compare against ``golden`` (the dict of golden_loss_metrics.pt).

    Returns rows (name, ours, reference, abs error, tolerance, "PASS"/"FAIL") and whether all passed.
    """
    from rsam.losses import RSAMLoss

    inputs = _need(golden, "inputs", "top level")
    logits = _need(inputs, "pred_masks_high_res", "inputs").float()
    gt = _need(inputs, "gt_masks", "inputs").bool()
    rows: List[Row] = []

    if "loss" in golden or "loss_per_expression" in golden:
        outputs = SimpleNamespace(logits=logits,
                                  iou_pred=_need(inputs, "pred_ious", "inputs").float(),
                                  object_score_logits=_need(inputs, "object_score_logits", "inputs").float())
        # The official configuration (rsam_b+_b.yaml): weights 20/1/1/1, focal 0.25/2, object score plain BCE.
        loss_fn = RSAMLoss(reduce_across_ranks=False)
        with torch.no_grad():
            losses = loss_fn(outputs, gt)
            terms = loss_fn.per_expression(outputs, gt)
        for k, ref in golden.get("loss", {}).items():
            ours = _need(losses, k, "our loss output")
            ref = float(ref)
            rows.append(_row(f"loss.{k}", float(ours), ref, max(LOSS_REL_TOL * abs(ref), LOSS_ABS_FLOOR)))
        for k, ref in golden.get("loss_per_expression", {}).items():
            if k not in PER_EXPRESSION_KEYS:
                raise KeyError(f"golden file: unknown loss_per_expression key '{k}' "
                               f"(known: {sorted(PER_EXPRESSION_KEYS)})")
            ours = terms[PER_EXPRESSION_KEYS[k]]
            for i, (a, b) in enumerate(zip(ours.tolist(), ref.tolist())):
                rows.append(_row(f"loss_per_expression.{k}[{i}]", a, b, max(LOSS_REL_TOL * abs(b), LOSS_ABS_FLOOR)))

    if "metrics" in golden or "metric_stats" in golden:
        stats = expression_stats(logits, gt, OFFICIAL)
        metrics = compute_metrics(stats, OFFICIAL)
        for k, ref in golden.get("metrics", {}).items():
            ours = _need(metrics, _official_metric_name(k), "our metrics")
            rows.append(_row(f"metrics.{k}", ours, float(ref), METRIC_TOL))
        for k, ref in golden.get("metric_stats", {}).items():
            if k == "iou_per_expression":
                ours, tol = per_expression_iou(stats, empty_value=math.nan), METRIC_TOL
            elif k in ("tp", "fp", "fn"):
                ours, tol = stats[k], 0.0
            else:
                raise KeyError(f"golden file: unknown metric_stats key '{k}' (known: tp, fp, fn, iou_per_expression)")
            for i, (a, b) in enumerate(zip(ours.tolist(), ref.tolist())):
                rows.append(_row(f"metric_stats.{k}[{i}]", float(a), float(b), tol))

    if not rows:
        raise KeyError("golden file has none of loss / loss_per_expression / metrics / metric_stats "
                       f"(has {sorted(golden)})")
    return rows, all(r[-1] == "PASS" for r in rows)


def format_rows(rows: Sequence[Row]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'name':<{width}}  {'ours':>14}  {'reference':>14}  {'abs err':>9}  {'tol':>9}  result"]
    for name, ours, ref, err, tol, res in rows:
        lines.append(f"{name:<{width}}  {ours:>14.8g}  {ref:>14.8g}  {err:>9.2e}  {tol:>9.2e}  {res}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="golden .pt file with loss / metrics keys (golden_loss_metrics.pt)")
    args = parser.parse_args(argv)
    try:
        golden = read_torch_file(args.file)
    except (OSError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rows, ok = check_loss_metrics(golden)
    except KeyError as exc:
        print(f"error: {args.file}: {exc.args[0]}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    failed = sum(r[-1] != "PASS" for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} checks passed" + ("" if ok else f", {failed} FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
