"""Picture files of a dataset (images and mask images): opened lazily, decoded to pixels.

PIL reads the header of every format (size, mode; and its decompression-bomb guard refuses huge files before
any pixel is decoded). The pixels of the two PNG kinds that datasets are made of, 8-bit RGB images and 8-bit
grey masks, are decoded by png.py in about a third of PIL's time (the largest single cost of a training sample
on a PNG dataset), to the same pixels. Colour JPEGs decode with ``simplejpeg`` (the same libjpeg-turbo and DCT
settings as PIL, so the same pixels) straight into an array, which saves PIL's repacking and copies (~1 ms at
800 px); a JPEG that libjpeg warns about, and every other kind (palette, grey + alpha, RGBA, 16-bit, grey or
CMYK JPEG, TIFF, ...), goes through PIL, which also decides what is an error.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import simplejpeg
from PIL import Image

from rsam.data.errors import DataError
from rsam.data.readers.png import decode_png, png_channels

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
    """Read the header of ``data`` (the bytes of ``path``). Raises :class:`DataError` naming ``path``."""
    try:
        header = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for unknown/corrupt headers
        raise DataError(path, f"unreadable {kind} ({type(e).__name__}: {e})", "image") from None
    return EncodedPicture(path, data, header)


def decode_rgb(picture: EncodedPicture, draft_size: Optional[int] = None) -> Union[np.ndarray, Image.Image]:
    """The pixels as RGB: a writable uint8 (H,W,3) array for an 8-bit RGB PNG or a colour JPEG, else a PIL RGB
    image.

    ``draft_size`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the network resolution is that much
    smaller than the file (a large saving at demo resolutions, none at 800 px).
    """
    try:
        if png_channels(picture.data) == 3:
            return decode_png(picture.data, 3)
        image = picture.header
        if image.format == "JPEG":
            if image.mode == "RGB" and (draft_size is None or min(image.size) < 2 * draft_size):
                try:  # strict: any libjpeg warning (damaged data) raises, and PIL below has the final word
                    return simplejpeg.decode_jpeg(picture.data, "RGB", strict=True)
                except ValueError:
                    pass
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise DataError(picture.path, f"corrupt image data ({type(e).__name__}: {e})", "image") from None


def decode_values(picture: EncodedPicture) -> np.ndarray:
    """The stored sample values of a mask picture, as PIL's ``np.asarray`` gives them (grey levels of a
    palette picture). Raises :class:`DataError` naming the file."""
    try:
        if png_channels(picture.data) == 1:
            return decode_png(picture.data, 1)
        image = picture.header
        values = np.asarray(image)
        if image.mode == "P":  # palette indices mean nothing to a threshold: use the grey levels
            values = np.asarray(image.convert("L"))
        return values
    except Exception as e:
        raise DataError(picture.path, f"corrupt mask data ({type(e).__name__}: {e})", "image") from None
