"""Merging overlapping tiles, streamed: only one row of tiles is in memory, whatever the scene's height.

Tiles arrive a tile row at a time, top to bottom (rsam/scene/tiling.py). A buffer holds the scene rows of the
current tile row, (expressions, tile height, scene width); when the row is done, every scene row above the
next tile row's start is final and leaves the buffer (:meth:`StripMerger.take`).

``max``: each pixel keeps the largest logit of the tiles covering it (an object cut by one tile's border is
still whole in the neighbour that holds it). ``blend``: the weighted mean of the covering tiles' logits, each
tile weighing less towards its borders (a linear ramp over ``overlap`` px), which smooths seams. A pixel no
tile was run on (or only tiles that found no object) is background: its logit is -inf.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from rsam.scene.tiling import Tile

__all__ = ["MERGES", "StripMerger", "ramp_weights"]

MERGES = ("max", "blend")


def ramp_weights(height: int, width: int, overlap: int) -> np.ndarray:
    """float32 (height, width): 1 inside, falling linearly to 1 / (overlap + 1) at the tile's borders."""

    def ramp(n: int) -> np.ndarray:
        edge = np.minimum(np.arange(n), np.arange(n)[::-1]) + 1.0
        return np.minimum(edge / (overlap + 1.0), 1.0).astype(np.float32)

    return ramp(height)[:, None] * ramp(width)[None, :]


class StripMerger:
    """Merged logits of ``count`` expressions over a ``width`` px wide scene, one tile row of ``tile_height``
    rows at a time (see the module docstring)."""

    def __init__(self, count: int, width: int, tile_height: int, merge: str = "max", overlap: int = 0):
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        self.merge, self.top = merge, 0
        self._overlap = overlap
        self._ramps: Dict[Tuple[int, int], np.ndarray] = {}  # tile (height, width) -> its weights
        self._shape = (count, tile_height, width)
        self._value = self._empty()  # max: running max; blend: weighted sum
        self._weight = np.zeros(self._shape, np.float32) if merge == "blend" else None

    def _empty(self) -> np.ndarray:
        fill = -np.inf if self.merge == "max" else 0.0
        return np.full(self._shape, fill, np.float32)

    def add(self, expression: int, tile: Tile, logits: np.ndarray) -> None:
        """Merge one tile's float32 (tile.height, tile.width) logits of one expression."""
        y = tile.y0 - self.top
        if y < 0 or y + tile.height > self._shape[1]:
            raise ValueError(f"tile at row {tile.y0} is outside the buffer (rows {self.top}..)")
        region = (expression, slice(y, y + tile.height), slice(tile.x0, tile.x0 + tile.width))
        if self.merge == "max":
            np.maximum(self._value[region], logits, out=self._value[region])
        else:
            key = (tile.height, tile.width)
            if key not in self._ramps:
                self._ramps[key] = ramp_weights(tile.height, tile.width, self._overlap)
            w = self._ramps[key]
            self._value[region] += w * logits
            self._weight[region] += w

    def take(self, until: int) -> np.ndarray:
        """The final logits of scene rows [top, until) -> float32 (count, until - top, width); the buffer then
        starts at ``until``."""
        n = until - self.top
        if self.merge == "max":
            done = self._value[:, :n].copy()
        else:
            weight = self._weight[:, :n]
            done = np.where(weight > 0, self._value[:, :n] / np.maximum(weight, 1e-12), -np.inf).astype(np.float32)
        self._value = self._shift(self._value, n, self._empty())
        if self._weight is not None:
            self._weight = self._shift(self._weight, n, np.zeros(self._shape, np.float32))
        self.top = until
        return done

    @staticmethod
    def _shift(old: np.ndarray, n: int, new: np.ndarray) -> np.ndarray:
        """``new`` with the rows of ``old`` below the first ``n`` moved to its top."""
        new[:, : old.shape[1] - n] = old[:, n:]
        return new
