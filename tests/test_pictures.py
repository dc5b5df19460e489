"""rsam.data.readers.pictures: dataset picture files decoded to the pixels PIL reads, whichever decoder runs.

Colour JPEGs go through simplejpeg, every other kind through PIL; these tests hold both paths to PIL's pixels,
check which path runs, that corrupt files are errors naming the file, and that the size PIL's header gives is
the size decoded (the pixel limit, a JPEG whose second frame header says another size).
"""
from __future__ import annotations

import contextlib
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from rsam.data.errors import DataError
from rsam.data import limits
from rsam.data.readers import pictures
from rsam.data.readers.pictures import decode_rgb, decode_values, open_picture

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
GREY = np.where(RNG.random((37, 53)) < 0.3, 255, 0).astype(np.uint8)
GREY[5, 7] = 17  # a value that is neither 0 nor 255: thresholds must see the stored level


def _png(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **params)
    return out.getvalue()


def _png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL saves RGB with 8 bits): high byte = ``pixels``, low byte 0x5A."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")

    h, w, _ = pixels.shape
    samples = (pixels.astype(">u2") << 8) | 0x5A
    rows = b"".join(b"\x00" + samples[y].tobytes() for y in range(h))  # filter type 0 on every row
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _jpeg(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **params)
    return out.getvalue()


SMOOTH = np.clip(np.add.outer(np.arange(48) * 4, np.arange(64) * 3)[..., None] + [0, 40, 90], 0, 255).astype(np.uint8)
JPEGS = {  # colour JPEGs go to simplejpeg (unless damaged), the others to PIL
    "jpeg_baseline": lambda: _jpeg(Image.fromarray(SMOOTH)),
    "jpeg_progressive": lambda: _jpeg(Image.fromarray(SMOOTH), progressive=True),
    "jpeg_subsampling_444": lambda: _jpeg(Image.fromarray(SMOOTH), subsampling=0),
    "jpeg_grey": lambda: _jpeg(Image.fromarray(SMOOTH).convert("L")),
    "jpeg_cmyk": lambda: _jpeg(Image.fromarray(SMOOTH).convert("CMYK")),
    # a run of zeros inside the entropy-coded data: libjpeg warns, PIL decodes it anyway
    "jpeg_damaged_inside": lambda: (lambda d: d[:len(d) * 3 // 4] + bytes(64) + d[len(d) * 3 // 4 + 64:])(
        _jpeg(Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)))),
}
SIMPLEJPEG_JPEGS = {"jpeg_baseline", "jpeg_progressive", "jpeg_subsampling_444"}

IMAGES = {
    "rgb": lambda: _png(Image.fromarray(RGB)),
    "rgb_colour_key": lambda: _png(Image.fromarray(RGB), transparency=tuple(int(v) for v in RGB[0, 0])),
    "rgb_level_0": lambda: _png(Image.fromarray(RGB), compress_level=0),
    "grey": lambda: _png(Image.fromarray(RGB).convert("L")),
    "rgba": lambda: _png(Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)]))),
    "palette": lambda: _png(Image.fromarray(RGB).convert("P")),
    "rgb16": lambda: _png_16bit_rgb(RGB),
    **JPEGS,
}
MASKS = {
    "grey": lambda: _png(Image.fromarray(GREY)),
    "grey_colour_key": lambda: _png(Image.fromarray(GREY), transparency=0),
    "one_bit": lambda: _png(Image.fromarray(GREY > 0)),
    "palette": lambda: _png(Image.fromarray(GREY).convert("P")),
    "grey16": lambda: _png(Image.fromarray(GREY.astype(np.uint16) * 257)),
    "rgb": lambda: _png(Image.fromarray(np.dstack([GREY] * 3))),
}
@pytest.fixture
def simplejpeg_results(monkeypatch):
    """'ok' or 'raised' for each simplejpeg.decode_jpeg call."""
    results = []
    decode = pictures.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        try:
            out = decode(*args, **kwargs)
        except ValueError:
            results.append("raised")
            raise
        results.append("ok")
        return out

    monkeypatch.setattr(pictures.simplejpeg, "decode_jpeg", spy)
    return results


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_images_decode_to_pils_rgb_pixels(kind, simplejpeg_results):
    data = IMAGES[kind]()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    pixels = decode_rgb(open_picture("x/img", data, "image"))
    assert np.asarray(pixels).dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(pixels), expected)
    # grey / CMYK JPEGs: PIL only; a damaged one: simplejpeg refused it, PIL decoded it
    assert simplejpeg_results == (["ok"] if kind in SIMPLEJPEG_JPEGS else
                                  ["raised"] if kind == "jpeg_damaged_inside" else [])
    if kind in SIMPLEJPEG_JPEGS:  # an array the transforms may own (black boxes are painted in place)
        assert pixels.flags.writeable and pixels.flags.c_contiguous


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_masks_decode_to_pils_stored_values(kind):
    data = MASKS[kind]()
    image = Image.open(io.BytesIO(data))
    expected = np.asarray(image.convert("L") if image.mode == "P" else image)
    values = decode_values(open_picture("x/mask.png", data, "mask"))
    assert values.dtype == expected.dtype
    np.testing.assert_array_equal(values, expected)


def _corrupt_idat(data: bytes) -> bytes:
    """The PNG with its pixel stream replaced by bytes that are not a deflate stream (valid chunk CRC)."""
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start:start + 4], "big")
    junk = bytes(range(256)) * (length // 256 + 1)
    junk = b"\x78\x9c" + junk[:length - 2]
    chunk = length.to_bytes(4, "big") + b"IDAT" + junk + zlib.crc32(b"IDAT" + junk).to_bytes(4, "big")
    return data[:start] + chunk + data[start + 12 + length:]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("which", ["image", "mask"])
def test_damaged_pngs_are_data_errors_naming_the_file(which, damage):
    data = IMAGES["rgb"]() if which == "image" else MASKS["grey"]()
    data = data[: len(data) // 2] if damage == "truncated" else _corrupt_idat(data)
    picture = open_picture(f"root/{which}s/0001.png", data, which)  # the header still reads
    with pytest.raises(DataError, match=f"root/{which}s/0001.png") as err:
        (decode_rgb if which == "image" else decode_values)(picture)
    assert err.value.reason == "image" and f"corrupt {which} data" in str(err.value)


def test_unreadable_header_names_the_file():
    with pytest.raises(DataError, match="root/images/a.png: unreadable image"):
        open_picture("root/images/a.png", b"not a picture", "image")



def test_a_draft_decode_stays_with_pil(simplejpeg_results):
    data = JPEGS["jpeg_baseline"]()  # 64x48
    small = decode_rgb(open_picture("x/img.jpg", data, "image"), draft_size=12)
    assert small.size == (16, 12) and simplejpeg_results == []  # libjpeg's 1/4 scale, as PIL's draft picks it
    full = decode_rgb(open_picture("x/img.jpg", data, "image"), draft_size=32)  # 1/2 scale would be under 32
    assert full.shape == (48, 64, 3) and simplejpeg_results == ["ok"]


def test_a_truncated_jpeg_is_a_data_error_naming_the_file(simplejpeg_results):
    data = JPEGS["jpeg_baseline"]()
    picture = open_picture("root/images/0001.jpg", data[:-100], "image")  # the header is whole
    with pytest.raises(DataError, match="root/images/0001.jpg: corrupt image data"):
        decode_rgb(picture)
    assert simplejpeg_results == ["raised"]


@pytest.mark.parametrize("lower", ["project", "pil"])
def test_pictures_over_the_pixel_limit_are_refused_before_decoding(lower, monkeypatch):
    data = IMAGES["rgb"]()  # 53 x 37 = 1961 pixels
    if lower == "project":
        monkeypatch.setattr(limits, "MAX_PICTURE_PIXELS", 1960)
    else:  # PIL's own guard, set lower than the project's limit, is the limit
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1960)
    pil_warns = pytest.warns(Image.DecompressionBombWarning) if lower == "pil" else contextlib.nullcontext()
    with pil_warns, pytest.raises(DataError, match=r"root/a.png: image of 53x37 pixels is over the limit of 1960 "):
        open_picture("root/a.png", data, "image")
    monkeypatch.setattr(limits, "MAX_PICTURE_PIXELS", 1961)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1961)
    assert open_picture("root/a.png", data, "image").width == 53


def test_simplejpeg_runs_only_where_its_header_gives_pils_size(monkeypatch, simplejpeg_results):
    data = JPEGS["jpeg_baseline"]()  # 64 x 48
    monkeypatch.setattr(pictures.simplejpeg, "decode_jpeg_header", lambda d: (4800, 6400, "YCbCr", "420"))
    pixels = decode_rgb(open_picture("x/img.jpg", data, "image"))
    assert simplejpeg_results == [] and isinstance(pixels, Image.Image) and pixels.size == (64, 48)
