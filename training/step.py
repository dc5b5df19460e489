"""One training step, as the trainer runs it and ``benchmarks/bench_train.py`` times it."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from torch import nn

from rsam.data.batch import Batch
from training.optimizer import ScheduledOptimizer

__all__ = ["TrainStep"]


class TrainStep:
    """Schedules at ``progress``, autocast forward and loss, backward, global-norm clip, AdamW step, zero_grad.

    Nothing here reads a value back to the host: the loss terms are returned as device tensors.

    Args:
        net: the model as it is called (possibly wrapped by DDP / ``torch.compile``).
        loss_fn: ``(RSAMOutput, gt masks (N, R, R) bool) -> dict`` with ``core_loss`` (e.g. ``rsam.losses.RSAMLoss``).
        optimizer: the :class:`training.optimizer.ScheduledOptimizer` over the trainable parameters.
        gradient_clip: max global L2 norm of the gradients (None / 0: no clipping).
        amp_dtype: autocast dtype (``torch.bfloat16``) or None for full precision.
    """

    def __init__(self, net: nn.Module, loss_fn: nn.Module, optimizer: ScheduledOptimizer,
                 gradient_clip: Optional[float] = None, amp_dtype: Optional[torch.dtype] = None):
        self.net = net
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.gradient_clip = gradient_clip
        self.amp_dtype = amp_dtype
        self.params = [p for p in net.parameters() if p.requires_grad]  # model order: a fixed clip-norm sum order

    def __call__(self, batch: Batch, progress: float) -> Dict[str, torch.Tensor]:
        """One step on ``batch`` (already on the device) at training progress ``progress`` in [0, 1]."""
        self.optimizer.set_progress(progress)
        device_type = batch.images.device.type
        autocast = (torch.autocast(device_type=device_type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = self.net(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
            losses = self.loss_fn(out, batch.masks)
        losses["core_loss"].backward()
        if self.gradient_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return losses
