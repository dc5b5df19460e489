"""Overview mode's coarse pass: the whole scene shrunk to the network input says whether the referred object
exists and where; the fine pass then runs only the tiles near it and keeps only what lies near it.

The coarse decision lives on the network's low-resolution logit grid (r x r cells, r = R/4, the overview
squashed to R x R as the predictor does): a cell is *wanted* when its logit is above the mask threshold, and
the wanted cells are dilated by one cell plus ``margin`` scene pixels. A tile is run when it covers a wanted
cell; its fine mask is kept inside the wanted cells only, so another object of the same kind in the same tile
("the ship at the top left" when the tile holds two ships) is not taken. A fine tile that the model gates (no
object in the tile alone: the expression may name a place the tile cannot see) falls back to the coarse
logits, bilinearly upsampled to the tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rsam.scene.tiling import Tile, cells_of

__all__ = ["Coarse", "coarse_pass"]


@dataclass
class Coarse:
    """One expression's coarse result on a ``height`` x ``width`` scene.

    low_res: float32 (r, r) logits of the overview; wanted: bool (r, r) dilated foreground cells.
    """

    low_res: torch.Tensor
    wanted: np.ndarray
    iou_pred: float
    object_score: float
    no_target: bool
    height: int
    width: int

    def _cells(self, y0: int, x0: int, h: int, w: int):
        r = self.wanted.shape[0]
        return cells_of(y0, h, self.height, r), cells_of(x0, w, self.width, r)

    def wants(self, tile: Tile) -> bool:
        """Whether the tile covers a wanted cell."""
        if self.no_target:
            return False
        rows, cols = self._cells(tile.y0, tile.x0, tile.height, tile.width)
        return bool(self.wanted[np.unique(rows)][:, np.unique(cols)].any())

    def allowed(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """bool (h, w): which pixels of the window lie in wanted cells."""
        rows, cols = self._cells(y0, x0, h, w)
        return self.wanted[rows[:, None], cols[None, :]]

    def logits(self, tile: Tile) -> np.ndarray:
        """float32 (h, w): the coarse logits bilinearly sampled at the tile's pixel centres."""
        ys = (np.arange(tile.y0, tile.y0 + tile.height) + 0.5) / self.height * 2 - 1
        xs = (np.arange(tile.x0, tile.x0 + tile.width) + 0.5) / self.width * 2 - 1
        grid = torch.stack(torch.meshgrid(torch.from_numpy(xs).float(), torch.from_numpy(ys).float(),
                                          indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        sampled = F.grid_sample(self.low_res[None, None], grid[None], mode="bilinear", padding_mode="border",
                                align_corners=False)
        return sampled[0, 0].numpy()


def _dilate(mask: np.ndarray, ky: int, kx: int) -> np.ndarray:
    """bool (r, r) grown by ``ky`` cells vertically and ``kx`` horizontally (a box)."""
    grown = F.max_pool2d(torch.from_numpy(mask).float()[None, None], kernel_size=(2 * ky + 1, 2 * kx + 1),
                         stride=1, padding=(ky, kx))
    return grown[0, 0].numpy() > 0


def coarse_pass(predictor, overview: np.ndarray, texts: Sequence[str], height: int, width: int,
                margin: int) -> List[Coarse]:
    """Run the expressions on ``overview`` (uint8 (h, w, 3), the scene shrunk) -> one :class:`Coarse` each.

    ``margin``: scene pixels added around the wanted cells (beyond the one-cell dilation).
    """
    (predictions,) = predictor.predict_batch([overview], [list(texts)])
    out = []
    for p in predictions:
        low_res = p.low_res_logits.float()
        r = low_res.shape[-1]
        ky = 1 + math.ceil(margin * r / height)
        kx = 1 + math.ceil(margin * r / width)
        wanted = _dilate((low_res > predictor.mask_threshold).numpy(), ky, kx)
        out.append(Coarse(low_res, wanted, float(p.iou_pred), float(p.object_score), bool(p.no_target),
                          height, width))
    return out
