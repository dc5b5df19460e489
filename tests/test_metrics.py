"""Metrics: parity with the official meters, hand-computed conventions, exact distributed gathering."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsam.evaluation.metrics import (
    OFFICIAL,
    STANDARD,
    MetricAccumulator,
    MetricConvention,
    compute_metrics,
    expression_stats,
    format_metrics,
    gather_stats,
    per_expression_iou,
)


@pytest.fixture(scope="module")
def golden(reference_file):
    return torch.load(reference_file("golden_loss_metrics.pt"), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# Official convention vs the golden file
# ----------------------------------------------------------------------------------------------------------
GOLDEN_NAMES = {"dice/mDice": "mDice", "iou/mIoU": "mIoU", "iou/cIoU": "oIoU", "precision/P@5": "Pr@0.5",
                "precision/P@6": "Pr@0.6", "precision/P@7": "Pr@0.7", "precision/P@8": "Pr@0.8",
                "precision/P@9": "Pr@0.9"}


def test_official_stats_exact(golden):
    inp = golden["inputs"]
    stats = expression_stats(inp["pred_masks_high_res"], inp["gt_masks"], "official")
    for k in ("tp", "fp", "fn"):
        assert stats[k].dtype == torch.int64
        assert torch.equal(stats[k], golden["metric_stats"][k]), k
    iou = per_expression_iou(stats, empty_value=math.nan)
    torch.testing.assert_close(iou, golden["metric_stats"]["iou_per_expression"].double(), atol=1e-6, rtol=0,
                               equal_nan=True)
    # (N,H,W) logits give the same stats as (N,1,H,W).
    stats3 = expression_stats(inp["pred_masks_high_res"][:, 0], inp["gt_masks"], OFFICIAL)
    assert all(torch.equal(stats[k], stats3[k]) for k in stats)


def test_official_metrics_match_golden(golden):
    inp = golden["inputs"]
    metrics = compute_metrics(expression_stats(inp["pred_masks_high_res"], inp["gt_masks"], "official"), "official")
    assert set(golden["metrics"]) == set(GOLDEN_NAMES)
    for ref_name, ours in GOLDEN_NAMES.items():
        assert abs(metrics[ours] - golden["metrics"][ref_name]) <= 1e-6, (ref_name, metrics[ours])
    assert metrics["num_expressions"] == 6


def test_official_accumulator_two_updates(golden):
    """The official meters were updated with batches of 4 and 2; chunking must not change anything."""
    inp = golden["inputs"]
    logits, gt = inp["pred_masks_high_res"], inp["gt_masks"]
    ids = [("img", i) for i in range(6)]
    acc = MetricAccumulator("official")
    acc.update(logits[:4], gt[:4], ids[:4])
    acc.update(logits[4:], gt[4:], ids[4:])
    two = acc.compute()
    acc.reset()
    acc.update(logits, gt, ids)
    assert acc.compute() == two
    assert abs(two["mIoU"] - golden["metrics"]["iou/mIoU"]) <= 1e-6
    # Tiny chunks inside expression_stats give identical integers.
    a = expression_stats(logits, gt, "official", chunk_pixels=1)
    b = expression_stats(logits, gt, "official")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_threshold_probe_pixels(golden):
    """Case 2 of the golden file has planted logits exactly 0.0 and 0.5: official counts 0.5 as foreground,
    standard counts 0.0 as background; the two conventions therefore differ on that expression."""
    inp = golden["inputs"]
    x, gt = inp["pred_masks_high_res"][2, 0], inp["gt_masks"][2]
    off = expression_stats(x[None], gt[None], "official")
    std = expression_stats(x[None], gt[None], "standard")
    assert int(off["tp"] + off["fp"]) == int((x >= 0.5).sum())
    assert int(std["tp"] + std["fp"]) == int((x > 0).sum())
    assert int(std["tp"]) > int(off["tp"])


# ----------------------------------------------------------------------------------------------------------
# Hand-built cases (4x4 masks), values computed by hand
# ----------------------------------------------------------------------------------------------------------
def _hand_cases():
    """Five expressions on 4x4 masks; returns logits (5,1,4,4), gt (5,4,4)."""
    gt = torch.zeros(5, 4, 4, dtype=torch.bool)
    x = torch.full((5, 4, 4), -5.0)
    # 0: gt = 4 pixels (row 0); prediction hits 3 of them plus 1 outside -> tp 3, fp 1, fn 1, IoU 0.6 (both).
    gt[0, 0, :] = True
    x[0, 0, :3] = 2.0
    x[0, 1, 0] = 2.0
    # 1: gt = 5 pixels; logits 0.5 (fg in both), 0.3 (fg only in standard), 0.0 (bg in both), 0.7 outside the gt
    #    official: fg {0.5, 0.5, 0.7} -> tp 2, fp 1, fn 3, IoU 2/6
    #    standard: fg {0.5, 0.5, 0.3, 0.3, 0.7} -> tp 4, fp 1, fn 1, IoU 4/6
    gt[1, 2, :] = True
    gt[1, 3, 0] = True
    x[1, 2, 0] = x[1, 2, 1] = 0.5
    x[1, 2, 2] = x[1, 2, 3] = 0.3
    x[1, 3, 0] = 0.0
    x[1, 0, 3] = 0.7
    # 2: empty gt, empty prediction (no-target success): union 0 -> IoU 0 and a miss; gIoU counts 1.
    # 3: empty gt, 2 predicted pixels (no-target failure): tp 0, fp 2.
    x[3, 1, 1] = x[3, 1, 2] = 3.0
    # 4: gt of 2 pixels, empty prediction (missed target): fn 2.
    gt[4, 3, 2:] = True
    return x[:, None], gt


def test_hand_stats():
    x, gt = _hand_cases()
    s = expression_stats(x, gt, "official")
    assert s["tp"].tolist() == [3, 2, 0, 0, 0]
    assert s["fp"].tolist() == [1, 1, 0, 2, 0]
    assert s["fn"].tolist() == [1, 3, 0, 0, 2]
    assert s["gt_empty"].tolist() == [False, False, True, True, False]
    assert s["pred_empty"].tolist() == [False, False, True, False, True]
    s = expression_stats(x, gt, "standard")
    assert s["tp"].tolist() == [3, 4, 0, 0, 0]
    assert s["fp"].tolist() == [1, 1, 0, 2, 0]
    assert s["fn"].tolist() == [1, 1, 0, 0, 2]


def test_hand_metrics_standard():
    x, gt = _hand_cases()
    m = compute_metrics(expression_stats(x, gt, "standard"), "standard")
    iou = [3 / 5, 4 / 6, 0.0, 0.0, 0.0]
    dice = [6 / 8, 8 / 10, 0.0, 0.0, 0.0]
    assert m["num_expressions"] == 5 and m["num_no_target"] == 2
    assert m["mIoU"] == pytest.approx(sum(iou) / 5, abs=1e-12)
    assert m["oIoU"] == pytest.approx(7 / (5 + 6 + 0 + 2 + 2), abs=1e-12)
    assert m["mDice"] == pytest.approx(sum(dice) / 5, abs=1e-12)
    # >=: IoU 0.6 counts at 0.6, 2/3 counts at 0.5 and 0.6.
    assert m["Pr@0.5"] == pytest.approx(2 / 5) and m["Pr@0.6"] == pytest.approx(2 / 5)
    assert m["Pr@0.7"] == 0.0 and m["Pr@0.8"] == 0.0 and m["Pr@0.9"] == 0.0
    # Positive-only (expressions 0, 1, 4).
    assert m["pos/mIoU"] == pytest.approx((3 / 5 + 4 / 6) / 3, abs=1e-12)
    assert m["pos/oIoU"] == pytest.approx(7 / 13, abs=1e-12)
    assert m["pos/Pr@0.6"] == pytest.approx(2 / 3) and m["pos/Pr@0.7"] == 0.0
    assert m["pos/mDice"] == pytest.approx((6 / 8 + 8 / 10) / 3, abs=1e-12)
    # No-target metrics: 1 of 2 empty targets predicted empty, 2 of 3 targets predicted non-empty.
    assert m["N-acc"] == 0.5
    assert m["T-acc"] == pytest.approx(2 / 3)
    assert m["gIoU"] == pytest.approx((3 / 5 + 4 / 6 + 1.0 + 0.0 + 0.0) / 5, abs=1e-12)


def test_hand_metrics_official():
    x, gt = _hand_cases()
    m = compute_metrics(expression_stats(x, gt, "official"), "official")
    iou = [3 / 5, 2 / 6, 0.0, 0.0, 0.0]
    assert m["mIoU"] == pytest.approx(sum(iou) / 5, abs=1e-12)
    assert m["oIoU"] == pytest.approx(5 / (5 + 6 + 0 + 2 + 2), abs=1e-12)
    # strict >: IoU exactly 0.6 is a hit at 0.5 but a miss at 0.6.
    assert m["Pr@0.5"] == pytest.approx(1 / 5) and m["Pr@0.6"] == 0.0
    assert m["mDice"] == pytest.approx((6 / 8 + 4 / 8) / 5, abs=1e-12)
    assert m["N-acc"] == 0.5 and m["T-acc"] == pytest.approx(2 / 3)


def test_no_no_target_keys_without_empty_targets():
    x, gt = _hand_cases()
    keep = [0, 1, 4]
    m = compute_metrics(expression_stats(x[keep], gt[keep], "standard"), "standard")
    assert not any(k.startswith("pos/") for k in m)
    assert "N-acc" not in m and "gIoU" not in m and "num_no_target" not in m
    assert m["mIoU"] == pytest.approx((3 / 5 + 4 / 6) / 3, abs=1e-12)


def test_precision_thresholds_exact_rational():
    """IoU exactly equal to a threshold (7/10, 4/5, 9/10) is a hit with >= and a miss with >, whatever the
    floating-point rounding of the ratio."""
    tp = torch.tensor([7, 4, 9, 70, 9])
    fp = torch.tensor([3, 1, 0, 29, 1])
    fn = torch.tensor([0, 0, 1, 1, 0])
    stats = {"tp": tp, "fp": fp, "fn": fn, "gt_empty": torch.zeros(5, dtype=torch.bool),
             "pred_empty": torch.zeros(5, dtype=torch.bool)}
    s = compute_metrics(stats, "standard")
    o = compute_metrics(stats, "official")
    # IoUs: 0.7, 0.8, 0.9, 0.7, 0.9
    assert s["Pr@0.7"] == 1.0 and s["Pr@0.8"] == 3 / 5 and s["Pr@0.9"] == 2 / 5
    assert o["Pr@0.7"] == 3 / 5 and o["Pr@0.8"] == 2 / 5 and o["Pr@0.9"] == 0.0


def test_per_category():
    x, gt = _hand_cases()
    cats = ["ship", "tank", "ship", "plane", "tank"]
    m = compute_metrics(expression_stats(x, gt, "standard"), "standard", cats)
    # Categories are scored on the expressions that have a target (0, 1, 4).
    assert m["cat/ship/mIoU"] == pytest.approx(3 / 5) and m["cat/ship/count"] == 1
    assert m["cat/tank/mIoU"] == pytest.approx((4 / 6 + 0.0) / 2) and m["cat/tank/count"] == 2
    assert "cat/plane/mIoU" not in m
    assert m["mIoU_cat"] == pytest.approx((3 / 5 + 2 / 6) / 2)
    # Without empty targets every expression counts.
    keep = [0, 1, 4]
    m = compute_metrics(expression_stats(x[keep], gt[keep], "official"), "official", [cats[i] for i in keep])
    assert m["cat/tank/mIoU"] == pytest.approx((2 / 6 + 0.0) / 2)


def test_convention_describe_and_errors():
    assert ">= 0.5" in OFFICIAL.describe() and "IoU > X" in OFFICIAL.describe()
    assert "> 0" in STANDARD.describe() and "IoU >= X" in STANDARD.describe()
    assert MetricConvention.get("standard") is STANDARD
    text = format_metrics({"num_expressions": 3, "mIoU": 0.5}, "official")
    assert text.splitlines()[0] == OFFICIAL.describe() and "50.00" in text
    with pytest.raises(ValueError, match="unknown metric convention"):
        MetricConvention.get("lavt")
    with pytest.raises(ValueError, match="gt"):
        expression_stats(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        expression_stats(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="no expressions"):
        MetricAccumulator().compute()


def test_gather_single_process_dedup_and_order():
    x, gt = _hand_cases()
    stats = expression_stats(x, gt, "standard")
    ids = [("b.png", 0), ("a.png", 1), ("a.png", 0), ("c.png", 2), ("a.png", 2)]
    # Duplicate expression 0 at the end (as DistributedSampler padding would) with JSON-style list ids.
    dup = {k: torch.cat([v, v[:1]]) for k, v in stats.items()}
    out, out_ids, cats = gather_stats(dup, ids + [["b.png", 0]], list("vwxyzv"))
    assert out_ids == sorted(ids)
    assert cats == ["x", "w", "z", "v", "y"]
    order = [ids.index(i) for i in out_ids]
    assert all(torch.equal(out[k], stats[k][order]) for k in stats)
    assert compute_metrics(out, "standard") == compute_metrics(stats, "standard")


# ----------------------------------------------------------------------------------------------------------
# 1 process vs 2 processes
# ----------------------------------------------------------------------------------------------------------
def _random_set(n: int = 23, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, size, size, generator=g) * 2 + 0.3
    gt = torch.rand(n, size, size, generator=g) > 0.6
    gt[::5] = False  # some no-target expressions
    logits[::10] = -1024.0  # some of them (and one positive) gated to an empty prediction
    is_neg = gt.flatten(1).sum(1) == 0
    ids = [(f"img{i // 3:03d}.tif", i % 3) for i in range(n)]
    cats = [["ship", "vehicle", "storage tank"][i % 3] for i in range(n)]
    return logits, gt, ids, cats, is_neg


# Shards (indices into the random set) per scenario: rank 0 list, rank 1 list, batch size.
SCENARIOS = {
    # DistributedSampler-style interleaving with one padding duplicate (23 -> 24).
    "padded": ([i for i in range(0, 23, 2)], [i for i in range(1, 23, 2)] + [0], 4),
    # Uneven contiguous shards, with duplicates across and within ranks.
    "uneven": (list(range(0, 17)) + [3], list(range(17, 23)) + [16, 5], 5),
    # Rank 1 sees nothing.
    "empty_rank": (list(range(23)), [], 7),
}


def _evaluate(indices, batch_size, convention):
    logits, gt, ids, cats, is_neg = _random_set()
    acc = MetricAccumulator(convention)
    for s in range(0, len(indices), batch_size):
        b = indices[s:s + batch_size]
        acc.update(logits[b], gt[b], [ids[i] for i in b], [cats[i] for i in b], is_neg[b])
    return acc


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (r0, r1, bs) in SCENARIOS.items():
            for conv in ("official", "standard"):
                acc = _evaluate([r0, r1][rank], bs, conv)
                metrics = acc.compute()
                stats, ids, cats = acc.gather()
                results[(name, conv)] = (metrics, {k: v.tolist() for k, v in stats.items()}, ids, cats)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather_identical(tmp_path):
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    logits, gt, ids, cats, is_neg = _random_set()
    for conv in ("official", "standard"):
        single = _evaluate(list(range(23)), 23, conv)
        ref_metrics = single.compute()
        ref_stats, ref_ids, ref_cats = single.gather()
        assert ref_metrics["num_expressions"] == 23 and ref_metrics["num_no_target"] == 5
        assert ref_metrics["num_negative"] == 5 and "cat/ship/mIoU" in ref_metrics
        for name in SCENARIOS:
            for r in range(2):
                metrics, stats, got_ids, got_cats = res[r][(name, conv)]
                # Bit-identical: same dict, same floats, no duplicates.
                assert metrics == ref_metrics, (name, conv, r)
                assert got_ids == ref_ids and len(set(got_ids)) == 23
                assert got_cats == ref_cats
                assert stats == {k: v.tolist() for k, v in ref_stats.items()}


def test_single_process_shards_match_full():
    """Without a process group, evaluating in a different order gives bit-identical numbers."""
    full = _evaluate(list(range(23)), 23, "standard").compute()
    perm = list(range(23))
    random.Random(1).shuffle(perm)
    assert _evaluate(perm + perm[:3], 3, "standard").compute() == full


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stats_without_host_sync(golden):
    inp = golden["inputs"]
    logits, gt = inp["pred_masks_high_res"].cuda(), inp["gt_masks"].cuda()
    acc = MetricAccumulator("official")
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        stats = expression_stats(logits, gt, "official", chunk_pixels=2 * 64 * 64)
        acc.update(logits, gt, [("img", i) for i in range(6)], None, gt.flatten(1).sum(1) == 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for v in stats.values())
    for k in ("tp", "fp", "fn"):
        assert torch.equal(stats[k].cpu(), golden["metric_stats"][k])
    assert abs(acc.compute()["mIoU"] - golden["metrics"]["iou/mIoU"]) <= 1e-6
