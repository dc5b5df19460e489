"""Activation checkpointing of repeated blocks: recompute a block's activations in the backward pass.

Modules with a stack of blocks (the Hiera trunk, the guidance and decoder transformers) keep a boolean
``activation_checkpointing`` attribute and call every block through :func:`run_block`. Switching it changes
neither the state dict nor the results: the non-reentrant ``torch.utils.checkpoint`` replays the block with
the RNG state it first ran with, so drop path and dropout draw the same numbers twice.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["run_block"]


def run_block(block: nn.Module, *args: Any, enabled: bool, **kwargs: Any) -> Any:
    """``block(*args, **kwargs)``; with ``enabled`` and autograd recording, without keeping its activations."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
