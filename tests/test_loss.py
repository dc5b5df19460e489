"""RSAM loss: parity with the official loss, gating, weights, normalisation across ranks."""
from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsam.tools.verify_loss_metrics import PER_EXPRESSION_KEYS, check_loss_metrics, main as verify_main
from rsam.losses import RSAMLoss, sigmoid_focal_loss


@pytest.fixture(scope="module")
def golden_path(reference_file):
    return reference_file("golden_loss_metrics.pt")


@pytest.fixture(scope="module")
def golden(golden_path):
    return torch.load(golden_path, map_location="cpu", weights_only=True)


def _outputs(golden):
    inp = golden["inputs"]
    return SimpleNamespace(low_res_logits=None, logits=inp["pred_masks_high_res"].clone(),
                           iou_pred=inp["pred_ious"].clone(), object_score_logits=inp["object_score_logits"].clone())


def test_loss_matches_golden(golden):
    losses = RSAMLoss({"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1})(
        _outputs(golden), golden["inputs"]["gt_masks"])
    assert set(losses) == set(golden["loss"])
    for k, ref in golden["loss"].items():
        assert losses[k].shape == ()
        torch.testing.assert_close(losses[k], ref, rtol=1e-5, atol=0, msg=k)


def test_loss_per_expression_matches_golden(golden):
    terms = RSAMLoss().per_expression(_outputs(golden), golden["inputs"]["gt_masks"])
    assert set(PER_EXPRESSION_KEYS) == set(golden["loss_per_expression"])
    for ref_key, ours in PER_EXPRESSION_KEYS.items():
        torch.testing.assert_close(terms[ours], golden["loss_per_expression"][ref_key], rtol=1e-5, atol=1e-7,
                                   msg=ref_key)


def test_verify_tool(golden, golden_path, capsys):
    rows, ok = check_loss_metrics(golden)
    assert ok, [r for r in rows if r[-1] != "PASS"]
    names = [r[0] for r in rows]
    assert "loss.core_loss" in names and "metrics.iou/cIoU" in names and "metric_stats.tp[5]" in names
    assert len(rows) == 5 + 6 * 6 + 8 + 4 * 6
    # A perturbed reference must fail (the check can fail), on the loss and on an exact integer.
    bad = copy.deepcopy(golden)
    bad["loss"]["loss_dice"] = bad["loss"]["loss_dice"] * (1 + 1e-4)
    bad["metric_stats"]["fp"] = bad["metric_stats"]["fp"].clone()
    bad["metric_stats"]["fp"][1] += 1
    rows, ok = check_loss_metrics(bad)
    assert not ok
    assert {r[0] for r in rows if r[-1] == "FAIL"} == {"loss.loss_dice", "metric_stats.fp[1]"}
    # Standalone CLI.
    assert verify_main([str(golden_path)]) == 0
    assert "73/73 checks passed" in capsys.readouterr().out
    with pytest.raises(KeyError, match="inputs"):
        check_loss_metrics({"loss": {}})


@pytest.mark.parametrize("content", [b"hello\n", b""])
def test_verify_tool_unreadable_file(tmp_path, capsys, content):
    """Regression: bytes torch.load trips on (KeyError / EOFError) gave a traceback instead of exit status 2."""
    path = tmp_path / "golden.pt"
    path.write_bytes(content)
    assert verify_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a readable torch file" in err
    assert verify_main([str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_focal_by_hand():
    # logit 0, target 1: BCE = ln 2, p_t = 0.5 -> (1 - p_t)^2 = 1/4, alpha_t = 0.25.
    x, y = torch.zeros(1), torch.ones(1)
    assert sigmoid_focal_loss(x, y).item() == pytest.approx(math.log(2) / 16, rel=1e-6)
    # target 0: alpha_t = 0.75.
    assert sigmoid_focal_loss(x, 1 - y).item() == pytest.approx(math.log(2) * 0.75 / 4, rel=1e-6)
    # gamma 0, alpha < 0: plain BCE.
    x = torch.tensor([1.3])
    assert sigmoid_focal_loss(x, y, alpha=-1, gamma=0).item() == pytest.approx(math.log1p(math.exp(-1.3)), rel=1e-6)


def test_gating_and_gradients():
    """A no-target expression only gets the class loss; a gated (-1024) positive gets a constant mask loss."""
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, 2:5, 2:5] = True
    gt[1, 0:2, :] = True  # gated positive
    logits = torch.randn(3, 1, 8, 8)
    logits[1] = -1024.0
    logits.requires_grad_(True)
    iou = torch.full((3, 1), 0.5, requires_grad=True)
    obj = torch.tensor([[2.0], [-1.0], [0.5]], requires_grad=True)
    loss_fn = RSAMLoss()
    out = loss_fn(SimpleNamespace(logits=logits, iou_pred=iou, object_score_logits=obj), gt)
    terms = loss_fn.per_expression(SimpleNamespace(logits=logits, iou_pred=iou, object_score_logits=obj), gt)
    o = torch.tensor([1.0, 1.0, 0.0])
    assert torch.equal(terms["target_obj"], o)
    torch.testing.assert_close(out["loss_mask"], (terms["focal"] * o).sum() / 3)
    torch.testing.assert_close(out["loss_class"], terms["class"].sum() / 3)
    # Gated positive: focal = 256 * |gt| / (H*W) exactly (BCE = 1024, weight (1-0)^2 * 0.25).
    assert terms["focal"][1].item() == pytest.approx(256 * 16 / 64, rel=1e-6)
    out["core_loss"].backward()
    # (The -1024 logits themselves do get a gradient from the focal term; it is the model's torch.where gate
    # that keeps it from reaching the network.)
    assert logits.grad[2].abs().max() == 0  # no target: no mask terms
    assert logits.grad[0].abs().max() > 0
    assert iou.grad[2].item() == 0 and iou.grad[0].item() != 0
    assert (obj.grad != 0).all()


def test_weight_dict_and_errors(golden):
    out = _outputs(golden)
    gt = golden["inputs"]["gt_masks"]
    base = RSAMLoss()(out, gt)
    w = {"loss_mask": 3.0, "loss_dice": 0.5, "loss_iou": 0.0, "loss_class": 2.0}
    custom = RSAMLoss(w)(out, gt)
    expected = sum(w[k] * base[k] for k in w)
    torch.testing.assert_close(custom["core_loss"], expected)
    with pytest.raises(ValueError, match="loss_foo"):
        RSAMLoss({"loss_foo": 1.0})
    with pytest.raises(ValueError, match="gt_masks"):
        RSAMLoss()(out, gt[:, :32])
    with pytest.raises(ValueError, match="multi-mask"):
        RSAMLoss()(SimpleNamespace(logits=out.logits.expand(-1, 3, -1, -1), iou_pred=out.iou_pred,
                                   object_score_logits=out.object_score_logits), gt)
    with pytest.raises(TypeError, match="object_score_logits"):
        RSAMLoss()(SimpleNamespace(logits=out.logits, iou_pred=out.iou_pred), gt)


def test_bf16_logits(golden):
    out = _outputs(golden)
    out.logits = out.logits.bfloat16()
    losses = RSAMLoss()(out, golden["inputs"]["gt_masks"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------------------------------------
# Normalisation over 2 processes
# ----------------------------------------------------------------------------------------------------------
def _rank_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    n = [3, 5][rank]
    gt = torch.rand(n, 8, 8, generator=g) > 0.5
    gt[-1] = False
    return SimpleNamespace(logits=torch.randn(n, 1, 8, 8, generator=g), iou_pred=torch.rand(n, 1, generator=g),
                           object_score_logits=torch.randn(n, 1, generator=g)), gt


def _loss_worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out, gt = _rank_data(rank)
        res = {"dist": RSAMLoss()(out, gt), "local": RSAMLoss(reduce_across_ranks=False)(out, gt)}
        torch.save(res, os.path.join(out_dir, f"loss{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_normalisation(tmp_path):
    mp.start_processes(_loss_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        res = torch.load(tmp_path / f"loss{rank}.pt", weights_only=True)
        out, gt = _rank_data(rank)
        n = gt.shape[0]
        loss_fn = RSAMLoss()
        terms = loss_fn.per_expression(out, gt)
        o = terms["target_obj"]
        # Mean expression count over the ranks: (3 + 5) / 2 = 4.
        expected = {"loss_mask": (o * terms["focal"]).sum() / 4, "loss_dice": (o * terms["dice"]).sum() / 4,
                    "loss_iou": (o * terms["iou"]).sum() / 4, "loss_class": terms["class"].sum() / 4}
        expected["core_loss"] = sum(loss_fn.weight_dict[k] * v for k, v in expected.items())
        for k, v in expected.items():
            torch.testing.assert_close(res["dist"][k], v, msg=f"rank {rank} {k}")
            torch.testing.assert_close(res["local"][k], v * 4 / n, msg=f"rank {rank} {k} (local)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loss_without_host_sync(golden):
    out = _outputs(golden)
    out = SimpleNamespace(**{k: (v.cuda() if v is not None else None) for k, v in vars(out).items()})
    gt = golden["inputs"]["gt_masks"].cuda()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        losses = RSAMLoss()(out, gt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, ref in golden["loss"].items():
        torch.testing.assert_close(losses[k].cpu(), ref, rtol=1e-5, atol=0, msg=k)
