"""Mask clean-up with connected components: fill small holes, remove small islands.

Definitions (SAM 2 semantics, 8-connectivity for both foreground and background, because that is
what :func:`rsam.ops.connected_components` computes):

- a *hole* is a connected component of background pixels with area <= ``fill_hole_area``. As in
  SAM 2 it may touch the image border: a small background pocket at the edge is filled too.
  (Background components are 8-connected, so a hole whose rim is closed only diagonally leaks into
  the outside and is not filled.)
- an *island* is a connected component of foreground pixels with area < ``min_island_area``
  (components of at least ``min_island_area`` pixels are kept; SAM 2's ``max_sprinkle_area`` is
  ``min_island_area - 1``).

Holes are filled first, then islands are found on the filled mask and removed. Area 0 disables a
step. All functions take masks of shape (..., H, W) on any device and work on every (H, W) slice
independently; the CUDA op labels the whole batch in one pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rsam.ops.connected_components import connected_components

__all__ = ["fill_holes", "remove_small_islands", "postprocess_masks"]

# Logit written where post-processing flips a pixel: threshold +- 10, as SAM 2's image predictor,
# far enough from the threshold that bilinear upsampling does not flip it back.
_LOGIT_MARGIN = 10.0


def _component_areas(foreground: Tensor) -> Tensor:
    """(..., H, W) bool -> (..., H, W) int32: each foreground pixel's component area, 0 elsewhere."""
    if foreground.numel() == 0:
        return torch.zeros_like(foreground, dtype=torch.int32)
    h, w = foreground.shape[-2:]
    _, areas = connected_components(foreground.reshape(-1, 1, h, w))
    return areas.view(foreground.shape)


def _check(masks: Tensor, area: int, name: str) -> None:
    if not isinstance(masks, Tensor) or masks.dim() < 2:
        raise ValueError(f"{name}: masks must be a tensor of shape (..., H, W), got {getattr(masks, 'shape', type(masks))}")
    if int(area) != area or area < 0:
        raise ValueError(f"{name}: the area must be a non-negative integer, got {area!r}")


def fill_holes(masks: Tensor, max_area: int) -> Tensor:
    """Sets every background component of area <= ``max_area`` to foreground.

    Args:
        masks: (..., H, W) bool.
        max_area: largest hole to fill, in pixels; 0 returns the masks unchanged.

    Returns:
        (..., H, W) bool, a new tensor.
    """
    _check(masks, max_area, "fill_holes")
    masks = masks.bool()
    if max_area == 0:
        return masks.clone()
    background = ~masks
    holes = background & (_component_areas(background) <= max_area)
    return masks | holes


def remove_small_islands(masks: Tensor, min_area: int) -> Tensor:
    """Sets every foreground component of area < ``min_area`` to background.

    Args:
        masks: (..., H, W) bool.
        min_area: smallest component to keep, in pixels; 0 (or 1) returns the masks unchanged.

    Returns:
        (..., H, W) bool, a new tensor.
    """
    _check(masks, min_area, "remove_small_islands")
    masks = masks.bool()
    if min_area <= 1:
        return masks.clone()
    return masks & (_component_areas(masks) >= min_area)


def postprocess_masks(
    masks: Tensor, fill_hole_area: int = 0, min_island_area: int = 0, threshold: float = 0.0
) -> Tensor:
    """Fills holes of area <= ``fill_hole_area``, then removes islands of area < ``min_island_area``.

    Args:
        masks: (..., H, W) bool masks, or floating-point mask logits (foreground = logit > threshold).
        fill_hole_area: largest hole to fill, in pixels (0: no filling).
        min_island_area: smallest foreground component to keep, in pixels (0: keep all).
        threshold: logit threshold; only used for floating-point input.

    Returns:
        Same shape and dtype as ``masks``: bool masks, or logits where filled pixels are set to
        ``threshold + 10`` and removed pixels to ``threshold - 10`` (run it on low-resolution
        logits before upsampling, as SAM 2 does, to keep the areas resolution-independent).
    """
    if not isinstance(masks, Tensor) or not (masks.dtype == torch.bool or masks.is_floating_point()):
        raise TypeError(f"postprocess_masks: masks must be a bool or floating-point tensor, got {getattr(masks, 'dtype', type(masks))}")
    logits = masks.is_floating_point()
    foreground = masks > threshold if logits else masks
    cleaned = remove_small_islands(fill_holes(foreground, fill_hole_area), min_island_area)
    if not logits:
        return cleaned
    out = torch.where(cleaned & ~foreground, torch.full_like(masks, threshold + _LOGIT_MARGIN), masks)
    return torch.where(foreground & ~cleaned, torch.full_like(masks, threshold - _LOGIT_MARGIN), out)
