"""Scene mode: referring segmentation of a scene of any size, tile by tile, into one mask file per expression.

1. Tiles of the network input size R at the scene's native resolution, overlapping (rsam/scene/tiling.py).
2. ``overview`` mode (default): the whole scene shrunk to the network input runs first and decides whether and
   where the object is (rsam/scene/coarse.py); only the tiles near it run. ``tiles`` mode: every tile runs every
   expression; meant for category-like expressions ("all storage tanks"), which every tile can answer.
   A scene that fits in one tile is that one tile, in both modes: exactly the plain ``rsam-predict`` result.
3. Tiles go through :meth:`rsam.predictor.RSAMPredictor.predict_batch` ``batch_size`` at a time (the image
   encoder once per tile, all the expressions that want the tile decoded together) and are merged row by row
   (rsam/scene/merge.py), thresholded, and written as they become final (rsam/scene/writer.py).

Memory: one tile row of merged logits per expression (4 x R x width bytes; twice that for ``blend``), one batch
of tiles and their logits, the R x R-scale overview; nothing of the scene's full size.

Scene scores: ``overview`` mode reports the coarse pass's ``iou_pred`` / ``object_score`` / ``no_target``;
``tiles`` mode the tile with the highest object score (``no_target``: no tile found the object).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from rsam.scene.coarse import Coarse, coarse_pass
from rsam.scene.merge import StripMerger
from rsam.scene.reader import SceneReader
from rsam.scene.tiling import Tile, tile_grid
from rsam.scene.writer import MaskWriter

__all__ = ["SCENE_MODES", "OVERVIEW_SIDE", "SceneOptions", "SceneResult", "segment_scene"]

SCENE_MODES = ("overview", "tiles")
OVERVIEW_SIDE = 1024  # long side of the overview read for the coarse pass and the picture (at least R)


@dataclass
class SceneOptions:
    """mode: ``overview`` or ``tiles``; merge: ``max`` or ``blend``; overlap: px between neighbouring tiles
    (None: R / 8); margin: scene px kept around the coarse mask (None: the overlap); batch_size: tiles per
    image-encoder call; progress: show a progress bar over tiles."""

    mode: str = "overview"
    merge: str = "max"
    overlap: Optional[int] = None
    margin: Optional[int] = None
    batch_size: int = 4
    progress: bool = False


@dataclass
class SceneResult:
    """One expression over the scene: its mask file, foreground pixels, scores and the tiles it ran on."""

    text: str
    mask_path: str
    area_px: int = 0
    iou_pred: float = 0.0
    object_score: float = float("-inf")
    no_target: bool = True
    tiles_run: int = 0


@dataclass
class _Plan:
    """What runs: the tile rows, and per tile (row, x0) the expressions that want it."""

    rows: List[List[Tile]]
    wanted: Dict[Tuple[int, int], List[int]] = field(default_factory=dict)
    coarse: Optional[List[Coarse]] = None


def _plan(predictor, reader: SceneReader, texts: Sequence[str], options: SceneOptions, size: int,
          overlap: int) -> Tuple[_Plan, Optional[np.ndarray]]:
    """The tile grid, the coarse pass (overview mode, more than one tile) and the overview it ran on."""
    rows = tile_grid(reader.height, reader.width, size, overlap)
    plan = _Plan(rows)
    single = len(rows) == 1 and len(rows[0]) == 1
    overview = None
    if options.mode == "overview" and not single:
        overview = reader.overview(max(OVERVIEW_SIDE, size))
        margin = overlap if options.margin is None else options.margin
        plan.coarse = coarse_pass(predictor, overview, texts, reader.height, reader.width, margin)
    for row in rows:
        for tile in row:
            exprs = [e for e in range(len(texts)) if plan.coarse is None or plan.coarse[e].wants(tile)]
            if exprs:
                plan.wanted[(tile.row, tile.x0)] = exprs
    return plan, overview


def segment_scene(predictor, reader: SceneReader, texts: Sequence[str], mask_paths: Sequence[str],
                  options: SceneOptions) -> Tuple[List[SceneResult], Optional[np.ndarray]]:
    """Segment ``texts`` over the scene of ``reader``; write mask k to ``mask_paths[k]`` (a Cloud-Optimized
    GeoTIFF, the scene's size, CRS and transform) -> (one :class:`SceneResult` each, the overview uint8
    (h, w, 3) of the coarse pass or None)."""
    from tqdm import tqdm

    size = int(predictor.model.image_size)
    overlap = size // 8 if options.overlap is None else options.overlap
    plan, overview = _plan(predictor, reader, texts, options, size, overlap)
    results = [SceneResult(t, p) for t, p in zip(texts, mask_paths)]
    if plan.coarse is not None:
        for r, c in zip(results, plan.coarse):
            r.iou_pred, r.object_score, r.no_target = c.iou_pred, c.object_score, c.no_target
    crs, transform = (reader.crs, reader.transform) if reader.georeferenced else (None, None)
    writers = [MaskWriter(p, reader.height, reader.width, crs, transform) for p in mask_paths]
    merger = StripMerger(len(texts), reader.width, plan.rows[0][0].height, options.merge, overlap)
    bar = tqdm(total=len(plan.wanted), unit="tile", disable=not options.progress, dynamic_ncols=True)
    try:
        for r, row in enumerate(plan.rows):
            todo = [t for t in row if (t.row, t.x0) in plan.wanted]
            for start in range(0, len(todo), options.batch_size):
                batch = todo[start:start + options.batch_size]
                _run_batch(predictor, reader, texts, batch, plan, merger, results)
                bar.update(len(batch))
            until = plan.rows[r + 1][0].y0 if r + 1 < len(plan.rows) else reader.height
            _flush(predictor, merger, until, plan.coarse, writers, results, reader.width)
        for w in writers:
            w.close()
    finally:
        bar.close()
        for w in writers:
            w.discard()
    return results, overview


def _run_batch(predictor, reader: SceneReader, texts: Sequence[str], batch: List[Tile], plan: _Plan,
               merger: StripMerger, results: List[SceneResult]) -> None:
    """Read, predict and merge one batch of tiles (each with the expressions that want it)."""
    images = [reader.window(t.y0, t.x0, t.height, t.width) for t in batch]
    wanted = [plan.wanted[(t.row, t.x0)] for t in batch]
    outputs = predictor.predict_batch(images, [[texts[e] for e in exprs] for exprs in wanted])
    for tile, exprs, predictions in zip(batch, wanted, outputs):
        for e, p in zip(exprs, predictions):
            results[e].tiles_run += 1
            if plan.coarse is None and p.object_score > results[e].object_score:
                results[e].object_score, results[e].iou_pred = float(p.object_score), float(p.iou_pred)
                results[e].no_target = bool(p.no_target)
            if not p.no_target:
                merger.add(e, tile, p.logits.numpy())
            elif plan.coarse is not None:  # gated in the tile alone: the coarse pass already said it is there
                merger.add(e, tile, plan.coarse[e].logits(tile))


def _flush(predictor, merger: StripMerger, until: int, coarse: Optional[List[Coarse]],
           writers: List[MaskWriter], results: List[SceneResult], width: int) -> None:
    """Threshold the final rows [merger.top, until) and write them."""
    top = merger.top
    if until <= top:
        return
    logits = merger.take(until)
    for e, w in enumerate(writers):
        mask = logits[e] > predictor.mask_threshold
        if coarse is not None:
            mask &= coarse[e].allowed(top, 0, until - top, width)
        w.write_rows(top, mask)
        results[e].area_px += int(mask.sum())
