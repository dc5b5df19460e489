"""The tile grid of a scene and, in overview mode, which tiles the coarse mask asks for.

Tiles are the network input size R at the scene's native resolution (a side shorter than R: that side whole),
overlapping by at least ``overlap`` px. The last tile of a row or column is moved inward to end at the
scene's edge instead of being padded, so every tile holds only real pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np

__all__ = ["Tile", "starts", "tile_grid", "cells_of"]


@dataclass(frozen=True)
class Tile:
    """A window of the scene: rows [y0, y0 + height), columns [x0, x0 + width); ``row``: its tile row."""

    row: int
    y0: int
    x0: int
    height: int
    width: int


def starts(length: int, tile: int, overlap: int) -> List[int]:
    """Tile offsets along one axis of ``length`` px: ``tile`` px each, neighbours overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def tile_grid(height: int, width: int, size: int, overlap: int) -> List[List[Tile]]:
    """Rows of tiles, top to bottom, each left to right (tiles of ``size`` px, or the whole side if shorter)."""
    th, tw = min(size, height), min(size, width)
    return [[Tile(r, y0, x0, th, tw) for x0 in starts(width, tw, overlap)]
            for r, y0 in enumerate(starts(height, th, overlap))]


def cells_of(start: int, length: int, scene_length: int, cells: int) -> np.ndarray:
    """The coarse cell (of ``cells`` across the scene's ``scene_length`` px) holding each pixel centre of
    [start, start + length) -> int (length,)."""
    centres = np.arange(start, start + length, dtype=np.float64) + 0.5
    return np.minimum((centres * cells / scene_length).astype(np.int64), cells - 1)
