"""One optimizer step, as the trainer runs it and ``benchmarks/bench_train.py`` times it."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from rsam.data.batch import Batch
from training.optimizer import ScheduledOptimizer

__all__ = ["TrainStep"]


class TrainStep:
    """Schedules at ``progress``; per micro-batch an autocast forward, loss and backward; global-norm clip,
    AdamW step, zero_grad.

    Gradient accumulation: a step over k micro-batches equals one step over their union. The loss normalises by
    the number of expressions (``rsam.losses``), so every micro-batch is normalised by the expression count of
    the whole step (known on the host: the collate counts it), not by its own; DDP all-reduces gradients once,
    after the last micro-batch. Each micro-batch keeps its own ``max_expressions_per_batch`` cap (the collate
    applies it), so a k x b accumulated step equals one k*b-image step when the cap does not bind; scale the
    cap with the micro-batch size to keep the paper's expressions per image.

    Nothing here reads a value back to the host: the loss terms are returned as device tensors (summed over the
    micro-batches: the terms of the whole step).

    Args:
        net: the model as it is called (possibly wrapped by DDP / ``torch.compile``).
        loss_fn: ``(RSAMOutput, gt masks (N, R, R) bool, valid=, num_objects=) -> dict`` with ``core_loss``
            (``rsam.losses.RSAMLoss``).
        optimizer: the :class:`training.optimizer.ScheduledOptimizer` over the trainable parameters.
        gradient_clip: max global L2 norm of the gradients (None / 0: no clipping).
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for full precision.
        grad_scaler: a ``torch.amp.GradScaler`` (float16 autocast); None otherwise.
        ddp: ``net`` itself or the ``DistributedDataParallel`` inside it, whose ``no_sync`` skips the gradient
            all-reduce of all but the last micro-batch; None without DDP.
    """

    def __init__(self, net: nn.Module, loss_fn: nn.Module, optimizer: ScheduledOptimizer,
                 gradient_clip: Optional[float] = None, amp_dtype: Optional[torch.dtype] = None,
                 grad_scaler: Optional["torch.amp.GradScaler"] = None, ddp: Optional[nn.Module] = None):
        self.net = net
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.gradient_clip = gradient_clip
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.ddp = ddp
        self.params = [p for p in net.parameters() if p.requires_grad]  # model order: a fixed clip-norm sum order

    def __call__(self, batches: Union[Batch, Sequence[Batch]], progress: float) -> Dict[str, torch.Tensor]:
        """One step on ``batches`` (micro-batches already on the device) at training progress in [0, 1]."""
        batches = [batches] if isinstance(batches, Batch) else list(batches)
        self.optimizer.set_progress(progress)
        num_objects = sum(b.num_valid for b in batches)  # host ints: no sync
        totals: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
            with sync:
                losses = self._forward_backward(batch, num_objects)
            for k, v in losses.items():
                totals[k] = totals[k] + v.detach() if k in totals else v.detach()
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer.optimizer)  # clip the true gradients
        if self.gradient_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip, foreach=True)
        if scaler is not None:
            scaler.step(self.optimizer.optimizer)  # skipped (and the scale lowered) when a gradient is inf / NaN
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return totals

    def _forward_backward(self, batch: Batch, num_objects: int) -> Dict[str, torch.Tensor]:
        device_type = batch.images.device.type
        autocast = (torch.autocast(device_type=device_type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = self.net(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
            losses = self.loss_fn(out, batch.masks, valid=batch.expr_valid, num_objects=num_objects)
        loss = losses["core_loss"]
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
        return losses
