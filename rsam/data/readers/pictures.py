"""Picture files of a dataset (images and mask images): opened lazily, decoded to pixels.

PIL reads the header of every format (size, mode; and its decompression-bomb guard refuses huge files before
any pixel is decoded). The pixels of the two PNG kinds that datasets are made of, 8-bit RGB images and 8-bit
grey masks, are decoded by libspng (the ``pyspng`` package): an 800 px RGB PNG decodes in about half of PIL's
time, the largest single cost of a training sample. libspng is asked for the file's own pixels, as PIL gives
them (no gamma correction, a colour-key transparency ignored), so the pixels are identical; every other kind
(palette, grey + alpha, RGBA, 16-bit, JPEG, TIFF, ...) goes through PIL.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import pyspng
from PIL import Image

from rsam.data.errors import DataError

__all__ = ["EncodedPicture", "open_picture", "decode_rgb", "decode_values"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY, _RGB = 0, 2  # PNG colour types (IHDR)


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

    def png_colour_type(self) -> Optional[int]:
        """The IHDR colour type of an 8-bit PNG; None for any other file (or bit depth)."""
        # Signature (8 bytes), IHDR length and tag (8), width and height (8), then bit depth and colour type.
        data = self.data
        if len(data) < 26 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[24] != 8:
            return None
        return data[25]


def open_picture(path: str, data: bytes, kind: str) -> EncodedPicture:
    """Read the header of ``data`` (the bytes of ``path``). Raises :class:`DataError` naming ``path``."""
    try:
        header = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for unknown/corrupt headers
        raise DataError(path, f"unreadable {kind} ({type(e).__name__}: {e})", "image") from None
    return EncodedPicture(path, data, header)


def decode_rgb(picture: EncodedPicture, draft_size: Optional[int] = None) -> Union[np.ndarray, Image.Image]:
    """The pixels as RGB: a writable uint8 (H,W,3) array for an 8-bit RGB PNG, else a PIL RGB image.

    ``draft_size`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the network resolution is that much
    smaller than the file (a large saving at demo resolutions, none at 800 px).
    """
    try:
        if picture.png_colour_type() == _RGB:
            return pyspng.load(picture.data, "RGB")
        image = picture.header
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise DataError(picture.path, f"corrupt image data ({type(e).__name__}: {e})", "image") from None


def decode_values(picture: EncodedPicture) -> np.ndarray:
    """The stored sample values of a mask picture, as PIL's ``np.asarray`` gives them (grey levels of a
    palette picture). Raises :class:`DataError` naming the file."""
    try:
        if picture.png_colour_type() == _GREY:
            return pyspng.load(picture.data, "L")
        image = picture.header
        values = np.asarray(image)
        if image.mode == "P":  # palette indices mean nothing to a threshold: use the grey levels
            values = np.asarray(image.convert("L"))
        return values
    except Exception as e:
        raise DataError(picture.path, f"corrupt mask data ({type(e).__name__}: {e})", "image") from None
