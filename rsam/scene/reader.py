"""A scene on disk, read a window at a time with rasterio (GeoTIFF, any GDAL raster, plain PNG / JPEG).

The whole scene is never in memory at full resolution: :meth:`SceneReader.window` reads one tile,
:meth:`SceneReader.overview` reads the scene shrunk by GDAL (area average), block by block.

Pixels become uint8 RGB with the rules of ``rsam-predict`` (rsam/tools/predict_inputs.py): 1 or 2 bands are
grey, 3 or 4 are RGB (+ alpha / NIR), more need ``--bands``; 8-bit values are kept. Deeper data is stretched per
band between its ``--stretch`` percentiles, which are computed once for the whole scene (on a 1024 px
overview) so that every tile is scaled alike; invalid pixels (nodata, NaN) become 0.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np

from rsam.errors import UserError

__all__ = ["SceneReader", "open_error"]

STATS_SIDE = 1024  # long side of the overview the stretch percentiles are computed on


def open_error(path: str, exc: Exception) -> UserError:
    """A rasterio / GDAL failure on ``path`` as one line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{path}: not a raster image rasterio can read ({first})")


def _pick_bands(path: str, count: int, bands: Optional[Sequence[int]]) -> List[int]:
    """1-based band indexes giving R, G, B (a grey band three times)."""
    if bands is None:
        if count > 4:
            raise UserError(f"{path}: {count} bands; pick three (R,G,B) or one with --bands, e.g. --bands 3,2,1")
        picked = [1] if count in (1, 2) else [1, 2, 3]
    else:
        missing = [b for b in bands if b > count]
        if missing:
            raise UserError(f"{path}: --bands {','.join(map(str, bands))}: the image has {count} band(s), "
                            f"no band {missing[0]}")
        picked = list(bands)
    return picked * 3 if len(picked) == 1 else picked


class SceneReader:
    """An open scene: size, georeference and uint8 RGB windows. Use as a context manager.

    Args:
        path: the raster file.
        bands: 1-based band numbers (3 = R,G,B or 1 = grey), None for the default rule above.
        stretch: low and high percentiles of the per-band stretch of non-8-bit data.
    """

    def __init__(self, path: str, bands: Optional[Sequence[int]] = None, stretch: Tuple[float, float] = (2.0, 98.0)):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._src = rasterio.open(path)
        except RasterioError as exc:
            raise open_error(path, exc) from None
        self.height, self.width = int(self._src.height), int(self._src.width)
        self.crs = self._src.crs
        self.transform = self._src.transform
        self._bands = _pick_bands(path, int(self._src.count), bands)
        self._eight_bit = all(self._src.dtypes[b - 1] == "uint8" for b in self._bands)
        self._stretch = stretch
        self._limits: Optional[np.ndarray] = None  # (3, 2) low / high per picked band

    @property
    def georeferenced(self) -> bool:
        """True when the file has a CRS or a non-identity transform (else: pixel coordinates)."""
        return self.crs is not None or not self.transform.is_identity

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._src.close()

    def _read(self, window=None, out_shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """The picked bands, (3, h, w) in the file's dtype (a window, or the scene shrunk to ``out_shape``)."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError

        unique = sorted(set(self._bands))
        shape = None if out_shape is None else (len(unique), *out_shape)
        try:
            data = self._src.read(unique, window=window, out_shape=shape, resampling=Resampling.average)
        except RasterioError as exc:
            raise open_error(self.path, exc) from None
        return data[[unique.index(b) for b in self._bands]]

    def _to_uint8(self, raw: np.ndarray) -> np.ndarray:
        """(3, h, w) raw -> uint8 (h, w, 3) (8-bit kept, deeper data stretched with the scene's limits)."""
        if self._eight_bit:
            return np.ascontiguousarray(np.moveaxis(raw, 0, -1))
        limits = self._band_limits()
        values = raw.astype(np.float32)
        valid = self._valid(values)
        lo, hi = limits[:, 0, None, None], limits[:, 1, None, None]
        scaled = np.clip((values - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
        out = np.where(valid & (hi > lo), np.round(scaled * 255.0), 0).astype(np.uint8)
        return np.ascontiguousarray(np.moveaxis(out, 0, -1))

    def _valid(self, values: np.ndarray) -> np.ndarray:
        valid = np.isfinite(values)
        nodata = self._src.nodata
        if nodata is not None and np.isfinite(nodata):
            valid &= values != nodata
        return valid

    def _band_limits(self) -> np.ndarray:
        """(3, 2) float: the stretch percentiles of each picked band over a STATS_SIDE overview."""
        if self._limits is None:
            values = self._read(out_shape=self._fit(STATS_SIDE)).astype(np.float32)
            valid = self._valid(values)
            limits = np.zeros((3, 2), np.float32)
            for i in range(3):
                sample = values[i][valid[i]]
                if sample.size:
                    limits[i] = np.percentile(sample, list(self._stretch))
            self._limits = limits
        return self._limits

    def _fit(self, long_side: int) -> Tuple[int, int]:
        """(h, w) of the scene shrunk so that its long side is at most ``long_side`` (aspect kept)."""
        scale = min(1.0, long_side / max(self.height, self.width))
        return max(1, round(self.height * scale)), max(1, round(self.width * scale))

    def overview(self, long_side: int) -> np.ndarray:
        """The scene shrunk to a long side of at most ``long_side`` px (area average) -> uint8 (h, w, 3)."""
        return self._to_uint8(self._read(out_shape=self._fit(long_side)))

    def window(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Pixels [y0, y0 + height) x [x0, x0 + width) at full resolution -> uint8 (height, width, 3)."""
        from rasterio.windows import Window

        return self._to_uint8(self._read(window=Window(x0, y0, width, height)))

    def check_readable(self) -> None:
        """Decode the last pixel (the end of the file for most layouts): a truncated file fails here."""
        self.window(self.height - 1, self.width - 1, 1, 1)
