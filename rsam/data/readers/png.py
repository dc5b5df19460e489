"""The two PNG kinds that datasets are made of, 8-bit RGB images and 8-bit grey masks, decoded fast.

An 800 px RGB PNG is the largest single cost of a training sample on a PNG dataset (RISBench). libpng and
libspng spend most of their time in zlib's inflate; here the chunks are walked in Python, the pixel stream is
inflated with ISA-L (the ``isal`` package, about twice zlib's speed) and the scanlines are unfiltered by the C
extension ``rsam._png`` (rsam/csrc/png_filters.c, SSE2 for RGB rows). Where that extension is not built (no C
compiler at install time) libspng (``pyspng``) decodes instead.

Both give the file's own samples, as PIL does: no gamma or colour-profile correction, a colour-key (tRNS)
transparency ignored. Interlaced files go to libspng; every other kind of picture is PIL's (pictures.py).
"""
from __future__ import annotations

import struct
from typing import Optional

import isal.isal_zlib as isal_zlib
import numpy as np
import pyspng

try:
    from rsam import _png
except ImportError:  # built by setup.py when a C compiler is found; libspng is the fallback
    _png = None

__all__ = ["DECODER", "png_channels", "decode_png"]

DECODER = "rsam._png+isal" if _png is not None else "pyspng"

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3}  # IHDR colour type -> samples per pixel: grey, RGB
_IDAT_CRC_START = isal_zlib.crc32(b"IDAT")


def png_channels(data: bytes) -> Optional[int]:
    """1 for an 8-bit grey PNG, 3 for an 8-bit RGB PNG (the kinds :func:`decode_png` reads), else None."""
    # Signature (8 bytes), IHDR length and tag (8), width and height (8), bit depth and colour type, ...: the
    # IHDR chunk ends at byte 33.
    if len(data) < 33 or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR" or data[24] != 8:
        return None
    return _CHANNELS.get(data[25])


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """The pixels of an 8-bit PNG of ``channels`` (:func:`png_channels`): a new uint8 array, (H,W,3) or (H,W).

    Raises ValueError saying what is damaged (a chunk's CRC, the pixel stream, a row's filter type).
    """
    width, height, interlaced = _header(data)
    if _png is None or interlaced:
        return pyspng.load(data, "RGB" if channels == 3 else "L")
    stream = _pixel_stream(data)
    expected = height * (1 + width * channels)  # one filter-type byte per row
    try:
        scanlines = isal_zlib.decompress(stream, bufsize=expected)
    except isal_zlib.error as e:
        raise ValueError(f"pixel stream does not inflate ({e})") from None
    if len(scanlines) != expected:
        raise ValueError(f"pixel stream holds {len(scanlines)} bytes, a {width}x{height} image needs {expected}")
    pixels = np.empty((height, width, channels) if channels == 3 else (height, width), np.uint8)
    _png.unfilter(scanlines, pixels, height, width, channels)
    return pixels


def _header(data: bytes) -> tuple:
    """(width, height, interlaced) from IHDR, after checking the fields that :func:`decode_png` relies on."""
    width, height, _, _, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if width == 0 or height == 0 or compression != 0 or filtering != 0 or interlace > 1:
        raise ValueError(f"IHDR: invalid {width}x{height} image (compression {compression}, filter {filtering}, "
                         f"interlace {interlace})")
    return width, height, interlace == 1


def _pixel_stream(data: bytes) -> memoryview:
    """The zlib stream of the IDAT chunks, each chunk's CRC checked (a view when there is one chunk)."""
    view, parts, pos = memoryview(data), [], 8
    while pos + 8 <= len(data):
        length, tag = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if tag == b"IDAT":
            if end + 4 > len(data):
                raise ValueError(f"IDAT chunk at byte {pos} is cut short (the file ends at byte {len(data)})")
            body = view[pos + 8:end]
            if isal_zlib.crc32(body, _IDAT_CRC_START) != int.from_bytes(data[end:end + 4], "big"):
                raise ValueError(f"IDAT chunk at byte {pos} fails its CRC check")
            parts.append(body)
        elif tag == b"IEND":
            break
        pos = end + 4
    if not parts:
        raise ValueError("no IDAT chunk (no pixel data)")
    return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
