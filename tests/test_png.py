"""rsam.data.readers.png and its C unfiltering (rsam._png): every PNG filter type reconstructs the exact pixels.

The PNGs here are written by hand with a chosen filter type per row (the filters are computed in numpy, from
the PNG spec), so each of None, Sub, Up, Average and Paeth is exercised on RGB and grey rows, through the SSE2
path and the portable C path, at sizes down to 1x1. Damaged files give errors that say what is damaged; an
interlaced file and a missing extension fall back to libspng.

In CI (``RSAM_REQUIRE_C_EXTENSIONS=1``, set by .ci/run) a missing extension is a failure; elsewhere the
extension's tests skip, since RSAM works without it.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from rsam.data.readers import png
from rsam.data.readers.png import decode_png, png_channels
from built_extensions import require_built


@pytest.fixture
def extension():
    return require_built(png._png, "rsam._png")


def _predictor(kind: int, left: np.ndarray, above: np.ndarray, above_left: np.ndarray) -> np.ndarray:
    a, b, c = (x.astype(np.int16) for x in (left, above, above_left))
    if kind == 0:
        return np.zeros_like(a)
    if kind == 1:
        return a
    if kind == 2:
        return b
    if kind == 3:
        return (a + b) // 2
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_scanlines(pixels: np.ndarray, filters) -> bytes:
    """The IDAT payload (before deflate) of ``pixels`` (H,W) or (H,W,C) with ``filters[y]`` on row ``y``."""
    h = pixels.shape[0]
    rows = pixels.reshape(h, -1).astype(np.int16)
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    out, above = [], np.zeros_like(rows[0])
    for y in range(h):
        row = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int16), row[:-bpp]])
        above_left = np.concatenate([np.zeros(bpp, np.int16), above[:-bpp]])
        residual = (row - _predictor(filters[y], left, above, above_left)) & 255
        out.append(bytes([filters[y]]) + residual.astype(np.uint8).tobytes())
        above = row
    return b"".join(out)


def _chunk(tag: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")


def write_png(pixels: np.ndarray, filters, idat_parts: int = 1, interlace: int = 0) -> bytes:
    h, w = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    stream = zlib.compress(filtered_scanlines(pixels, filters))
    cuts = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, colour_type, 0, 0, interlace])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", b"Comment\x00made by hand")
            + b"".join(_chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts[:-1], cuts[1:])) + _chunk(b"IEND", b""))


def _pixels(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.integers(-9, 10, (h, w, channels)), axis=1) + np.arange(h)[:, None, None] * 3
    pixels = (smooth % 256).astype(np.uint8)
    pixels[rng.random((h, w)) < 0.05] = 255  # some large jumps: Paeth picks each of a, b and c
    return pixels[..., 0] if channels == 1 else pixels


SIZES = [(1, 1), (1, 6), (5, 1), (2, 2), (13, 17), (40, 33)]


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4, "mixed"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_every_filter_type_reconstructs_the_pixels(extension, size, filter_type, channels, portable):
    h, w = size
    pixels = _pixels(h, w, channels)
    filters = (np.random.default_rng(1).integers(0, 5, h) if filter_type == "mixed" else [filter_type] * h)
    scanlines = filtered_scanlines(pixels, filters)
    out = np.full(pixels.shape, 7, np.uint8)
    extension.unfilter(scanlines, out, h, w, channels, portable)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_png_reads_every_idat_chunk(extension, channels):
    pixels = _pixels(31, 29, channels, seed=3)
    data = write_png(pixels, np.random.default_rng(2).integers(0, 5, 31), idat_parts=3)
    assert png_channels(data) == channels
    decoded = decode_png(data, channels)
    assert decoded.shape == pixels.shape and decoded.flags.writeable and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, pixels)


def test_png_channels_names_only_the_two_fast_kinds():
    grey = write_png(_pixels(3, 4, 1), [0] * 3)
    assert png_channels(grey) == 1 and png_channels(write_png(_pixels(3, 4, 3), [0] * 3)) == 3
    sixteen_bit = grey[:24] + bytes([16]) + grey[25:]
    palette = grey[:25] + bytes([3]) + grey[26:]
    assert png_channels(sixteen_bit) is None and png_channels(palette) is None
    assert png_channels(b"\xff\xd8\xff\xe0 a JPEG") is None and png_channels(grey[:30]) is None


def _with_idat_byte_changed(data: bytes, offset: int, value: int, fix_crc: bool) -> bytes:
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start:start + 4], "big")
    body = bytearray(data[start + 8:start + 8 + length])
    body[offset] = value
    crc = zlib.crc32(b"IDAT" + body) if fix_crc else int.from_bytes(data[start + 8 + length:start + 12 + length], "big")
    return data[:start + 8] + bytes(body) + crc.to_bytes(4, "big") + data[start + 12 + length:]


def _with_ihdr(data: bytes, offset: int, new: bytes) -> bytes:
    """``data`` with IHDR bytes from ``offset`` (of the file) replaced, and the IHDR CRC made right again."""
    data = data[:offset] + new + data[offset + len(new):]
    return data[:29] + zlib.crc32(data[12:29]).to_bytes(4, "big") + data[33:]


def test_damaged_files_say_what_is_damaged(extension):
    pixels = _pixels(9, 8, 3)
    good = write_png(pixels, [4] * 9)
    with pytest.raises(ValueError, match="IDAT chunk at byte .* fails its CRC check"):
        decode_png(_with_idat_byte_changed(good, 5, good[good.index(b"IDAT") + 9] ^ 0xFF, fix_crc=False), 3)
    with pytest.raises(ValueError, match="pixel stream does not inflate"):
        decode_png(_with_idat_byte_changed(good, 5, good[good.index(b"IDAT") + 9] ^ 0xFF, fix_crc=True), 3)
    with pytest.raises(ValueError, match=f"IDAT chunk at byte {good.index(b'IDAT') - 4} is cut short"):
        decode_png(good[: good.index(b"IDAT") + 20], 3)
    with pytest.raises(ValueError, match="no IDAT chunk"):
        decode_png(good[:33] + _chunk(b"IEND", b""), 3)

    short = _with_ihdr(write_png(pixels[:8], [0] * 8), 20, (9).to_bytes(4, "big"))  # 8 rows; IHDR says 9
    with pytest.raises(ValueError, match=r"pixel stream holds 200 bytes, a 8x9 image needs 225"):
        decode_png(short, 3)

    bad_filter = write_png(pixels, [0, 1, 2, 5, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="row 3 has filter type 5"):
        decode_png(bad_filter, 3)


def test_unfilter_checks_its_buffers(extension):
    scanlines = filtered_scanlines(_pixels(4, 5, 3), [0] * 4)
    with pytest.raises(ValueError, match="61 bytes of scanlines, a 4 x 5 x 3 image needs 64"):
        extension.unfilter(scanlines[:61], np.empty((4, 5, 3), np.uint8), 4, 5, 3)
    with pytest.raises(ValueError, match="the output holds 59 bytes"):
        extension.unfilter(scanlines, np.empty(59, np.uint8), 4, 5, 3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        extension.unfilter(scanlines, np.empty(60, np.uint8), 4, 5, 2)
    with pytest.raises(ValueError, match="too large"):  # checked before any size is multiplied
        extension.unfilter(scanlines, np.empty(60, np.uint8), 2**40, 2**40, 3)
    read_only = np.empty((4, 5, 3), np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(TypeError):
        extension.unfilter(scanlines, read_only, 4, 5, 3)


def test_interlaced_files_and_a_missing_extension_go_to_libspng(monkeypatch):
    pixels = _pixels(6, 7, 3)
    data = write_png(pixels, [1] * 6)
    calls = []
    load = png.pyspng.load
    monkeypatch.setattr(png.pyspng, "load", lambda *a: calls.append(a[1]) or load(*a))

    interlaced = _with_ihdr(data, 28, b"\x01")
    with pytest.raises(Exception):  # the stream is not really Adam7: what matters is who read it
        decode_png(interlaced, 3)
    assert calls == ["RGB"]

    monkeypatch.setattr(png, "_png", None)
    np.testing.assert_array_equal(decode_png(data, 3), pixels)
    grey = _pixels(6, 7, 1)
    np.testing.assert_array_equal(decode_png(write_png(grey, [4] * 6), 1), grey)
    assert calls == ["RGB", "RGB", "L"]
