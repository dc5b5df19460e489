"""RSAM training loss: focal + dice + IoU-prediction + object-score terms.

The terms and their normalisation follow the official RSAM configuration (one mask per expression, one
prediction step; SAM 2's multi-step loss with a single step and a single mask). With N expressions, mask logits x_i, ground truth y_i,
predicted IoU rho_i and object-score logit s_i:

    o_i        = 1 if y_i has a pixel else 0        target of the object score, gate of the three mask terms
    n_obj      = max(1, mean over ranks of N)
    loss_mask  = sum_i o_i * mean_pixels(sigmoid_focal(x_i, y_i))            / n_obj
    loss_dice  = sum_i o_i * (1 - (2 sum sig(x_i) y_i + 1) / (sum sig(x_i) + sum y_i + 1)) / n_obj
    loss_iou   = sum_i o_i * |rho_i - IoU(x_i > 0, y_i)|                      / n_obj
    loss_class = sum_i BCE(s_i, o_i)                                          / n_obj   (not gated)
    core_loss  = sum_k weight_dict[k] * loss_k           (default weights 20, 1, 1, 1)

A no-target expression (empty y_i) is therefore trained only through its object score. When a positive
expression's object score is <= 0 the model has already replaced its mask logits by -1024: the mask terms are
then a large constant with zero gradient, and only the object score can recover.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from rsam import distributed

__all__ = ["sigmoid_focal_loss", "dice_loss", "mask_iou", "per_expression_losses", "RSAMLoss", "DEFAULT_WEIGHTS"]

DEFAULT_WEIGHTS = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 1.0}


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss (Lin et al. 2017) on logits; same shape as the inputs.

    ``alpha < 0`` disables the class balancing and ``gamma = 0`` the focusing, which leaves plain BCE.
    """
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma != 0:
        prob = logits.sigmoid()
        # 1 - p_t: the probability given to the wrong class.
        p_wrong = prob + targets - 2 * prob * targets
        ce = ce * p_wrong.pow(gamma)
    if alpha >= 0:
        ce = ce * (alpha * targets + (1 - alpha) * (1 - targets))
    return ce


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """(N,) soft dice loss of (N,H,W) logits against (N,H,W) float targets, +``smooth`` on both sides."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + targets.sum(-1) + smooth)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N,) float IoU of (logits > 0) against the (N,H,W) bool ground truth; 0 for an empty union."""
    pred = logits > 0
    inter = (pred & gt).flatten(1).sum(-1)
    union = (pred | gt).flatten(1).sum(-1)
    return inter.float() / union.clamp(min=1).float()


def per_expression_losses(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    object_score_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_alpha_obj_score: float = -1.0,
    focal_gamma_obj_score: float = 0.0,
    iou_use_l1_loss: bool = True,
) -> Dict[str, torch.Tensor]:
    """Unnormalised, ungated per-expression loss terms.

    Args:
        logits: (N,1,H,W) or (N,H,W) mask logits at the ground-truth resolution.
        iou_pred: (N,1) or (N,) predicted IoU.
        object_score_logits: (N,1) or (N,) object-score logits.
        gt_masks: (N,H,W) bool.
    Returns:
        dict of (N,) float tensors: ``focal`` (mean over pixels), ``dice``, ``iou`` (L1 or squared error of
        the IoU prediction), ``class`` (object-score loss), ``target_obj`` (o_i) and ``actual_iou``
        (the IoU target, no gradient).
    """
    n = gt_masks.shape[0]
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError(f"RSAMLoss: expected one mask per expression, logits (N,1,H,W); got "
                             f"{tuple(logits.shape)} (multi-mask outputs are not supported)")
        logits = logits[:, 0]
    if logits.shape != gt_masks.shape or gt_masks.dim() != 3:
        raise ValueError(f"RSAMLoss: logits {tuple(logits.shape)} do not match gt_masks {tuple(gt_masks.shape)} "
                         f"(both must be (N,H,W) at the same resolution; logits may be (N,1,H,W))")
    if gt_masks.dtype != torch.bool:
        raise ValueError(f"RSAMLoss: gt_masks must be bool, got {gt_masks.dtype}")
    for name, t in (("iou_pred", iou_pred), ("object_score_logits", object_score_logits)):
        if t.numel() != n:
            raise ValueError(f"RSAMLoss: {name} has shape {tuple(t.shape)}, expected ({n},1)")

    # The loss runs inside the bf16 autocast region; do the arithmetic in float32.
    logits = logits.float()
    iou_pred = iou_pred.float().reshape(n)
    obj = object_score_logits.float().reshape(n)
    target = gt_masks.float()
    target_obj = gt_masks.flatten(1).any(-1).float()

    actual_iou = mask_iou(logits, gt_masks)
    iou_err = iou_pred - actual_iou
    return {
        "focal": sigmoid_focal_loss(logits, target, focal_alpha, focal_gamma).flatten(1).mean(-1),
        "dice": dice_loss(logits, target),
        "iou": iou_err.abs() if iou_use_l1_loss else iou_err.square(),
        "class": sigmoid_focal_loss(obj, target_obj, focal_alpha_obj_score, focal_gamma_obj_score),
        "target_obj": target_obj,
        "actual_iou": actual_iou,
    }


def _num_objects(n: Union[int, torch.Tensor], device: torch.device, reduce_across_ranks: bool) -> torch.Tensor:
    """max(1, mean over ranks of the local expression count), as a device tensor (no host sync)."""
    num = n.float().to(device) if isinstance(n, torch.Tensor) else torch.full((), float(n), device=device)
    if reduce_across_ranks and distributed.is_distributed():
        # Every rank divides by the same count, so the DDP gradient average equals the gradient of the
        # global per-expression mean even when ranks hold different numbers of expressions.
        num = distributed.all_reduce(num) / distributed.world_size()
    return num.clamp(min=1)


class RSAMLoss(nn.Module):
    """The RSAM training loss (see the module docstring for the formulas).

    Args:
        weight_dict: weights of ``loss_mask``, ``loss_dice``, ``loss_iou``, ``loss_class`` in ``core_loss``
            (missing keys take the defaults 20 / 1 / 1 / 1).
        focal_alpha, focal_gamma: focal loss of the mask pixels.
        focal_alpha_obj_score, focal_gamma_obj_score: focal loss of the object score (-1 / 0 = plain BCE).
        iou_use_l1_loss: L1 (True, RSAM) or squared (False) error of the IoU prediction.
        reduce_across_ranks: normalise by the expression count averaged over the process group.
    """

    def __init__(
        self,
        weight_dict: Optional[Mapping[str, float]] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_alpha_obj_score: float = -1.0,
        focal_gamma_obj_score: float = 0.0,
        iou_use_l1_loss: bool = True,
        reduce_across_ranks: bool = True,
    ):
        super().__init__()
        weights = dict(DEFAULT_WEIGHTS)
        for k, v in dict(weight_dict or {}).items():
            if k not in DEFAULT_WEIGHTS:
                raise ValueError(f"RSAMLoss: unknown weight_dict key {k!r}; expected some of {list(DEFAULT_WEIGHTS)}")
            weights[k] = float(v)
        self.weight_dict = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.focal_alpha_obj_score = focal_alpha_obj_score
        self.focal_gamma_obj_score = focal_gamma_obj_score
        self.iou_use_l1_loss = iou_use_l1_loss
        self.reduce_across_ranks = reduce_across_ranks

    def per_expression(self, outputs, gt_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Unnormalised, ungated (N,) terms for ``outputs`` (anything with ``logits``, ``iou_pred``,
        ``object_score_logits``)."""
        for name in ("logits", "iou_pred", "object_score_logits"):
            if not hasattr(outputs, name):
                raise TypeError(f"RSAMLoss: outputs ({type(outputs).__name__}) has no attribute '{name}'")
        return per_expression_losses(
            outputs.logits, outputs.iou_pred, outputs.object_score_logits, gt_masks,
            self.focal_alpha, self.focal_gamma, self.focal_alpha_obj_score, self.focal_gamma_obj_score,
            self.iou_use_l1_loss,
        )

    def forward(self, outputs, gt_masks: torch.Tensor, valid: Optional[torch.Tensor] = None,
                num_objects: Union[None, int, torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """outputs: RSAMOutput-like (logits (N,1,H,W), iou_pred (N,1), object_score_logits (N,1));
        gt_masks: (N,H,W) bool. Returns 0-d tensors ``loss_mask``, ``loss_dice``, ``loss_iou``,
        ``loss_class`` and ``core_loss`` (the weighted sum to back-propagate).

        valid: optional (N,) bool, False on padding rows (static-shape batches): they add nothing and are not
            counted. num_objects: the local count to normalise by instead of this batch's (valid) expressions,
            e.g. the count of a whole accumulated step.
        """
        terms = self.per_expression(outputs, gt_masks)
        if num_objects is None:
            num_objects = gt_masks.shape[0] if valid is None else valid.sum()
        num = _num_objects(num_objects, terms["focal"].device, self.reduce_across_ranks)
        keep = None if valid is None else valid.to(terms["class"].dtype)
        o = terms["target_obj"] if keep is None else terms["target_obj"] * keep
        losses = {
            "loss_mask": (o * terms["focal"]).sum() / num,
            "loss_dice": (o * terms["dice"]).sum() / num,
            "loss_iou": (o * terms["iou"]).sum() / num,
            "loss_class": (terms["class"] if keep is None else keep * terms["class"]).sum() / num,
        }
        losses["core_loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        return losses
