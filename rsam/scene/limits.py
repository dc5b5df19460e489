"""The documented limits of scene mode, checked before any tile runs (:func:`check_scene_limits`).

* ``AUTO_SCENE_PIXELS``: ``rsam-predict`` without ``--scene`` / ``--no-scene`` runs scene mode on an image of
  more pixels than this (25 megapixels, e.g. 5000 x 5000), when rasterio is installed.
* ``MAX_SCENE_PIXELS``: 2 gigapixels (about 44700 x 44700). Beyond it one expression's uncompressed mask is over
  2 GB, the polygons of a category-like expression over it no longer fit in memory comfortably, and the fine
  pass is tens of thousands of tiles (days on a CPU): split the scene first (``gdal_translate -srcwin``).
* Disk: the free space of the output folder must hold the masks uncompressed (1 byte a pixel, plus a third for
  the overviews of the Cloud-Optimized GeoTIFF) for every expression, plus one temporary copy. Masks compress
  far better than that; the check is the worst case (an incompressible mask), so no run stops half-way.
* ``RLE_MAX_PIXELS``: below 16.7 megapixels (4096 x 4096) ``predictions.jsonl`` also carries the mask as a COCO
  RLE; above it only the path of the mask GeoTIFF.
"""
from __future__ import annotations

import os
import shutil

from rsam.errors import UserError

__all__ = ["AUTO_SCENE_PIXELS", "MAX_SCENE_PIXELS", "RLE_MAX_PIXELS", "check_scene_limits", "bytes_needed"]

AUTO_SCENE_PIXELS = 25_000_000
MAX_SCENE_PIXELS = 2_000_000_000
RLE_MAX_PIXELS = 4096 * 4096


def bytes_needed(height: int, width: int, expressions: int) -> int:
    """Worst-case disk bytes of a scene's outputs: an uncompressed uint8 mask + overviews (4/3) per expression,
    and one more for the temporary file each mask is written to first."""
    return (expressions + 1) * height * width * 4 // 3


def check_scene_limits(path: str, height: int, width: int, expressions: int, out_dir: str) -> None:
    """Raise :class:`UserError` (one line naming ``path``) when the scene is larger than ``MAX_SCENE_PIXELS`` or
    its outputs may not fit in the free space of ``out_dir`` (an existing folder or one to be created)."""
    pixels = height * width
    if pixels > MAX_SCENE_PIXELS:
        raise UserError(f"{path}: {width} x {height} px = {pixels / 1e9:.1f} gigapixels, more than scene mode takes "
                        f"({MAX_SCENE_PIXELS / 1e9:.0f} gigapixels, about 44700 x 44700 px; see rsam/scene/limits.py)"
                        ": split it first, e.g. gdal_translate -srcwin")
    need = bytes_needed(height, width, expressions)
    free = shutil.disk_usage(_existing_parent(out_dir)).free
    if need > free:
        raise UserError(f"{path}: the masks of {expressions} expression(s) over {width} x {height} px may need "
                        f"{need / 1e9:.1f} GB in --out {out_dir}, which has {free / 1e9:.1f} GB free")


def _existing_parent(folder: str) -> str:
    """``folder`` or its nearest existing ancestor (``--out`` is created later)."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder
