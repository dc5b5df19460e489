"""A scene mask written a band of rows at a time, published as a Cloud-Optimized GeoTIFF.

The rows go to a temporary striped, deflate-compressed GeoTIFF beside the target; :meth:`MaskWriter.close`
copies it with GDAL's COG driver (512 px tiles, deflate, internal overviews, so a GIS or a HTTP range reader
opens any part of it quickly) through :func:`rsam.atomic_files.atomic_path`, and removes the temporary file.
Neither step holds the whole mask in memory. The mask is uint8, 255 on the object and 0 elsewhere, with the
scene's CRS and transform (none for a plain picture: pixel coordinates).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, Tuple

import numpy as np

from rsam.atomic_files import atomic_path

__all__ = ["MaskWriter", "read_mask"]

BLOCK = 512


class MaskWriter:
    """Write bool rows of a ``height`` x ``width`` mask top to bottom, then :meth:`close` -> ``path``."""

    def __init__(self, path: str, height: int, width: int, crs=None, transform=None):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path, self.height, self.width = path, height, width
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self._rows_path = os.path.join(folder, f".{name}.{os.getpid()}.rows.tif")
        profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8",
                   "compress": "deflate", "BIGTIFF": "IF_SAFER", "crs": crs}
        if transform is not None:
            profile["transform"] = transform
        with warnings.catch_warnings():  # a picture without georeference is written without one, on purpose
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self._dst = rasterio.open(self._rows_path, "w", **profile)
        self.written = 0  # rows written so far

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Rows [y0, y0 + h) of the mask, bool (h, width); rows come in order."""
        from rasterio.windows import Window

        if y0 != self.written or rows.shape[1] != self.width:
            raise ValueError(f"{self.path}: rows must come in order at full width (got row {y0} of shape "
                             f"{rows.shape}, expected row {self.written} of width {self.width})")
        self._dst.write(np.where(rows, 255, 0).astype(np.uint8)[None], window=Window(0, y0, self.width, len(rows)))
        self.written += len(rows)

    def close(self) -> str:
        """Publish the Cloud-Optimized GeoTIFF at ``path`` -> ``path``."""
        import rasterio.shutil

        self._dst.close()
        if self.written != self.height:
            self.discard()
            raise ValueError(f"{self.path}: {self.written} of {self.height} rows written")
        try:
            with atomic_path(self.path) as tmp:
                rasterio.shutil.copy(self._rows_path, str(tmp), driver="COG", COMPRESS="DEFLATE",
                                     BLOCKSIZE=str(BLOCK), OVERVIEW_RESAMPLING="NEAREST", BIGTIFF="IF_SAFER")
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Remove the temporary file (the target, if any, is left as it was)."""
        if not self._dst.closed:
            self._dst.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._rows_path)


def read_mask(path: str, out_shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A written mask -> bool (H, W), or shrunk to ``out_shape`` (h, w), a pixel being on when any part of the
    area it covers is (so small objects stay visible in a picture)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        # OVERVIEW_LEVEL=NONE: shrink from the full-resolution mask, not from its (nearest-neighbour) overviews
        with rasterio.open(path, OVERVIEW_LEVEL="NONE") as src:
            if out_shape is None:
                return src.read(1) > 0
            return src.read(1, out_shape=out_shape, resampling=Resampling.average) > 0
