"""Synthetic large scenes: objects of the synthetic dataset (rsam/data/synthetic) on a large georeferenced
canvas, written block by block (the canvas is never whole in memory).

    python -m rsam.scene.synthetic --out scene.tif --size 12000 --objects 60 --seed 0

The file is a tiled (512 px), deflate-compressed 3-band uint8 GeoTIFF in UTM zone 33N (EPSG:32633) at 0.5 m a
pixel, its top left corner at easting 500000 m, northing 5000000 m (central Europe). The ground is a smooth
tone plus grain; each object comes from :func:`rsam.data.synthetic.make_scene` (its pixels only, cut out by its
mask) and is placed in its own cell of a grid, so objects never overlap. ``<out>.objects.json`` lists them
(category, colour, bounding box in scene pixels) for choosing expressions and checking results.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PlacedObject", "write_synthetic_scene", "CRS", "PIXEL_SIZE", "ORIGIN"]

CRS = "EPSG:32633"
PIXEL_SIZE = 0.5  # metres
ORIGIN = (500000.0, 5000000.0)  # easting, northing of the top left corner
BLOCK = 1024  # rows and columns generated and written at a time
TONE_CELL = 384  # px between the control points of the ground's smooth tone


@dataclass
class PlacedObject:
    """An object on the canvas: what it is and its bounding box (rows y0..y1, columns x0..x1, end exclusive)."""

    category: str
    colour: str
    y0: int
    x0: int
    y1: int
    x1: int


@dataclass
class _Patch:
    y0: int
    x0: int
    pixels: np.ndarray  # uint8 (s, s, 3)
    mask: np.ndarray  # bool (s, s)


def _patches(rng: np.random.Generator, height: int, width: int, count: int, object_size: int,
             object_frac: Tuple[float, float]) -> Tuple[List[_Patch], List[PlacedObject]]:
    """``count`` objects, each cut out of a synthetic scene of ``object_size`` px, in distinct grid cells."""
    from rsam.data.synthetic import make_scene

    rows, cols = height // object_size, width // object_size
    count = min(count, rows * cols)
    cells = rng.choice(rows * cols, size=count, replace=False)
    patches, placed = [], []
    for cell in cells:
        image, masks, objects, _ = make_scene(rng, object_size, min_objects=2, max_objects=2,
                                              min_object_frac=object_frac[0], max_object_frac=object_frac[1])
        k = int(np.argmax([m.sum() for m in masks]))
        y0, x0 = int(cell // cols) * object_size, int(cell % cols) * object_size
        patches.append(_Patch(y0, x0, image, masks[k]))
        ys, xs = np.nonzero(masks[k])
        placed.append(PlacedObject(objects[k].category, objects[k].colour, y0 + int(ys.min()), x0 + int(xs.min()),
                                   y0 + int(ys.max()) + 1, x0 + int(xs.max()) + 1))
    return patches, placed


def _ground(grid: np.ndarray, base: np.ndarray, y0: int, x0: int, h: int, w: int,
            rng: np.random.Generator) -> np.ndarray:
    """float32 (h, w, 3) ground of the window: the tone grid bilinearly interpolated, plus grain."""
    gy = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) / TONE_CELL
    gx = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) / TONE_CELL
    iy, ix = gy.astype(np.int64), gx.astype(np.int64)
    fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
    tone = (grid[iy][:, ix] * (1 - fy) * (1 - fx) + grid[iy + 1][:, ix] * fy * (1 - fx)
            + grid[iy][:, ix + 1] * (1 - fy) * fx + grid[iy + 1][:, ix + 1] * fy * fx)
    grain = rng.standard_normal((h, w), dtype=np.float32) * 3.5
    return base[None, None, :] + (tone + grain)[..., None]


def write_synthetic_scene(path: str, height: int, width: Optional[int] = None, objects: int = 60, seed: int = 0,
                          object_size: int = 128, object_frac: Tuple[float, float] = (0.25, 0.42),
                          crs: Optional[str] = CRS) -> List[PlacedObject]:
    """Write the scene (module docstring) to ``path`` -> the placed objects. ``object_size``: side of the
    synthetic scene each object comes from; ``object_frac``: its extent as a fraction of that side (the demo
    model's training scale by default); ``crs=None``: no georeference (pixel coordinates)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    width = height if width is None else width
    rng = np.random.default_rng(seed)
    patches, placed = _patches(rng, height, width, objects, object_size, object_frac)
    grid = rng.uniform(-16, 16, (math.ceil(height / TONE_CELL) + 2, math.ceil(width / TONE_CELL) + 2))
    grid = grid.astype(np.float32)
    base = np.asarray([150, 142, 118], np.float32)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "photometric": "RGB"}
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(ORIGIN[0], ORIGIN[1], PIXEL_SIZE, PIXEL_SIZE))
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, height, BLOCK):
            for x0 in range(0, width, BLOCK):
                h, w = min(BLOCK, height - y0), min(BLOCK, width - x0)
                block = np.clip(_ground(grid, base, y0, x0, h, w, rng), 0, 255).astype(np.uint8)
                _paste(block, y0, x0, patches)
                dst.write(np.moveaxis(block, -1, 0), window=Window(x0, y0, w, h))
    with open(path + ".objects.json", "w", encoding="utf-8") as f:
        json.dump([asdict(p) for p in placed], f, indent=1)
    return placed


def _paste(block: np.ndarray, y0: int, x0: int, patches: Sequence[_Patch]) -> None:
    """Copy the object pixels of the patches that intersect the block (uint8 (h, w, 3) at (y0, x0))."""
    h, w = block.shape[:2]
    for p in patches:
        s = p.mask.shape[0]
        ya, yb = max(p.y0, y0), min(p.y0 + s, y0 + h)
        xa, xb = max(p.x0, x0), min(p.x0 + s, x0 + w)
        if ya >= yb or xa >= xb:
            continue
        mask = p.mask[ya - p.y0:yb - p.y0, xa - p.x0:xb - p.x0]
        target = block[ya - y0:yb - y0, xa - x0:xb - x0]
        target[mask] = p.pixels[ya - p.y0:yb - p.y0, xa - p.x0:xb - p.x0][mask]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rsam.scene.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="GeoTIFF to write")
    p.add_argument("--size", type=int, default=4096, help="scene side in pixels (default 4096)")
    p.add_argument("--width", type=int, default=None, help="width when it differs from --size")
    p.add_argument("--objects", type=int, default=60, help="objects to place (default 60)")
    p.add_argument("--object-size", type=int, default=128, help="side of the scene each object is drawn in")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    placed = write_synthetic_scene(args.out, args.size, args.width, args.objects, args.seed, args.object_size)
    print(f"{args.out}: {args.width or args.size} x {args.size} px, {len(placed)} objects ({CRS}, {PIXEL_SIZE} m)")


if __name__ == "__main__":
    main()
