"""Mixed precision: which autocast dtype a run uses, and whether it needs a GradScaler."""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from rsam.errors import UserError

__all__ = ["resolve_precision", "make_grad_scaler"]

LOG = logging.getLogger("rsam.train")

_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(enabled: bool, dtype: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """``(autocast dtype or None, needs a GradScaler)`` for ``trainer.amp``; logs the choice once.

    ``dtype: auto`` picks bfloat16 on GPUs that support it (Ampere and newer), float16 with a GradScaler on
    older ones (V100, T4), and full precision on the CPU. ``bfloat16`` / ``float16`` are taken as asked on
    any device (float16 always with a GradScaler: its range is too small for unscaled gradients).
    """
    if not enabled:
        LOG.info("precision: float32 (trainer.amp.enabled is false)")
        return None, False
    if dtype == "auto":
        if device.type != "cuda":
            LOG.info("precision: float32 on %s (trainer.amp.dtype=auto uses mixed precision on GPUs only)",
                     device.type)
            return None, False
        dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        LOG.info("precision: %s autocast (auto: %s)%s", dtype, torch.cuda.get_device_name(device),
                 " with a GradScaler" if dtype == "float16" else "")
    elif dtype in _NAMES:
        LOG.info("precision: %s autocast on %s%s", dtype, device.type,
                 " with a GradScaler" if dtype == "float16" else "")
    else:
        raise UserError(f"trainer.amp.dtype must be auto, bfloat16 or float16, got {dtype!r}")
    return _NAMES[dtype], dtype == "float16"


def make_grad_scaler(device: torch.device) -> "torch.amp.GradScaler":
    return torch.amp.GradScaler(device.type)
