"""Picture files of a dataset (images and mask images): opened lazily, decoded to pixels.

The size of a picture is decided once, by the header PIL reads: PIL's decompression-bomb guard and the
project's lower limit for datasets (``MAX_PICTURE_PIXELS``, rsam/data/limits.py) refuse a huge picture before
any pixel is decoded, and no decoder may return more pixels than that header says.

PIL decodes every kind (PNG, TIFF, palette, 16-bit, grey, CMYK, ...) and decides what is an error. The one
other decoder is ``simplejpeg`` for colour JPEGs (the same libjpeg-turbo and DCT settings as PIL, so the same
pixels), straight into an array: it saves PIL's repacking and copies, the largest single cost of a training
sample on a JPEG dataset. It runs only when its own reading of the header gives PIL's size, in strict mode (any
libjpeg warning raises); a JPEG it refuses goes to PIL, which has the final word.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import simplejpeg
from PIL import Image

from rsam.data.errors import DataError
from rsam.data.limits import picture_pixel_limit

__all__ = ["EncodedPicture", "open_picture", "decode_rgb", "decode_values"]


@dataclass(frozen=True)
class EncodedPicture:
    """A picture file's bytes and its lazily opened PIL header (size, mode and format known, no pixels)."""

    path: str
    data: bytes
    header: Image.Image

    @property
    def width(self) -> int:
        return self.header.width

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def mode(self) -> str:
        return self.header.mode


def open_picture(path: str, data: bytes, kind: str) -> EncodedPicture:
    """Read the header of ``data`` (the bytes of ``path``). Raises :class:`DataError` naming ``path`` for an
    unreadable header or a picture over the pixel limit."""
    try:
        header = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for unknown/corrupt headers, and its bomb error
        raise DataError(path, f"unreadable {kind} ({type(e).__name__}: {e})", "image") from None
    limit = picture_pixel_limit()
    if header.width * header.height > limit:
        raise DataError(path, f"{kind} of {header.width}x{header.height} pixels is over the limit of {limit} "
                              "pixels for dataset pictures (rsam/data/limits.py)", "image")
    return EncodedPicture(path, data, header)


def _simplejpeg_rgb(picture: EncodedPicture) -> Optional[np.ndarray]:
    """The pixels of a colour JPEG by simplejpeg, or None where PIL must decide (another size in the header
    libjpeg reads, any libjpeg warning)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(picture.data)
        if (width, height) != picture.header.size:
            return None
        pixels = simplejpeg.decode_jpeg(picture.data, "RGB", strict=True)
    except ValueError:
        return None
    return pixels if pixels.shape == (picture.height, picture.width, 3) else None


def decode_rgb(picture: EncodedPicture, draft_size: Optional[int] = None) -> Union[np.ndarray, Image.Image]:
    """The pixels as RGB: a writable uint8 (H,W,3) array for a colour JPEG, else a PIL RGB image.

    ``draft_size`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the network resolution is that much
    smaller than the file (a large saving at demo resolutions, none at 800 px).
    """
    image = picture.header
    try:
        if image.format == "JPEG":
            if image.mode == "RGB" and (draft_size is None or min(image.size) < 2 * draft_size):
                pixels = _simplejpeg_rgb(picture)
                if pixels is not None:
                    return pixels
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise DataError(picture.path, f"corrupt image data ({type(e).__name__}: {e})", "image") from None
    if draft_size is None:
        _check_size(picture, (rgb.height, rgb.width), "image")
    return rgb


def decode_values(picture: EncodedPicture) -> np.ndarray:
    """The stored sample values of a mask picture, as PIL's ``np.asarray`` gives them (grey levels of a
    palette picture). Raises :class:`DataError` naming the file."""
    image = picture.header
    try:
        values = np.asarray(image)
        if image.mode == "P":  # palette indices mean nothing to a threshold: use the grey levels
            values = np.asarray(image.convert("L"))
    except Exception as e:
        raise DataError(picture.path, f"corrupt mask data ({type(e).__name__}: {e})", "image") from None
    _check_size(picture, values.shape[:2], "mask")
    return values


def _check_size(picture: EncodedPicture, shape: tuple, kind: str) -> None:
    """Refuse pixels of another size than the header's (PIL allocates by its header: this holds the invariant
    for every decoder)."""
    if tuple(shape) != (picture.height, picture.width):
        raise DataError(picture.path, f"{kind} decoded to {shape[0]}x{shape[1]} pixels, its header says "
                                      f"{picture.height}x{picture.width}", "image")
