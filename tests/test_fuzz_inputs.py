"""A bounded fuzz pass over what a dataset file can hand the readers: mutated PNG / JPEG pictures, COCO RLE
strings and pickles (fixed seed, a few thousand of each, a few seconds in all).

Valid inputs must give what the libraries give (PIL's pixels, pycocotools' masks, the standard unpickler's
value); invalid ones a clean error of the project's own type (``DataError`` / ``UserError``), never another
exception, a crash or a hang. RLE strings are judged by a plain reference parser below before pycocotools may
see them (pycocotools itself is not safe on invalid strings).
"""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rsam.data.errors import DataError
from rsam.data.readers.pictures import decode_rgb, decode_values, open_picture
from rsam.data.rle import RLEError, decode_rles
from rsam.data.safe_pickle import load_plain_pickle
from rsam.errors import UserError

SEED = 2028


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three random edits: flip a byte, set one to a chosen value, cut, duplicate or drop a span."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 5))
        at = int(rng.integers(0, max(len(out), 1)))
        if kind == 0 and out:
            out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and out:
            out[at] = int(rng.choice([0, 0xFF, 0x20, 0x30, 0x6F, 0x70, int(rng.integers(0, 256))]))
        elif kind == 2:
            del out[at:]
        elif kind == 3:
            out[at:at] = out[at:at + int(rng.integers(1, 16))]
        else:
            del out[at:at + int(rng.integers(1, 16))]
    return bytes(out)


# ------------------------------------------------------------------------------------------------ pictures


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _seed_pictures() -> list:
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
    smooth = Image.fromarray(np.add.outer(np.arange(16) * 9, np.arange(24) * 5).astype(np.uint8)).convert("RGB")
    grey = Image.fromarray((rng.random((10, 11)) > 0.5).astype(np.uint8) * 255)
    return [_encoded(rgb, "PNG"), _encoded(rgb, "PNG", optimize=True), _encoded(grey, "PNG"),
            _encoded(rgb.convert("P"), "PNG"), _encoded(grey.convert("1"), "PNG"),
            _encoded(smooth, "JPEG", quality=85), _encoded(smooth, "JPEG", progressive=True)]


def _pil_or_none(data: bytes, convert):
    """What PIL makes of ``data`` (``convert`` applied), or None where PIL refuses it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(convert(image))
    except Exception:
        return None


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _as_values(image: Image.Image) -> Image.Image:
    return image.convert("L") if image.mode == "P" else image


def _ours_or_none(data: bytes, decode):
    try:
        return np.asarray(decode(open_picture("root/x.pic", data, "image")))
    except DataError as e:
        assert str(e).startswith("root/x.pic: ")
        return None


def test_mutated_pictures_decode_as_pil_decodes_them_or_are_data_errors():
    rng = np.random.default_rng(SEED)
    seeds = _seed_pictures()
    decoded = refused = 0
    for i in range(1500):
        data = mutate(seeds[i % len(seeds)], rng)
        for ours, pil in ((decode_rgb, _as_rgb), (decode_values, _as_values)):
            expected, got = _pil_or_none(data, pil), _ours_or_none(data, ours)
            if expected is None:
                assert got is None, f"mutant {i}: PIL refuses it, {ours.__name__} decoded it"
                refused += 1
            else:
                assert got is not None and np.array_equal(got, expected), f"mutant {i}: pixels differ from PIL's"
                decoded += 1
    assert decoded > 300 and refused > 300  # both outcomes are exercised


# ------------------------------------------------------------------------------------------------ COCO RLE


def reference_runs(counts: bytes, h: int, w: int):
    """The runs of a compressed COCO RLE string, or None when the string is not a valid h x w mask: a plain
    loop over the format, with the same rules as rsam.data.rle (alphabet, terminated values of at most 7
    characters, no negative run, runs adding up to h x w)."""
    runs, p = [], 0
    while p < len(counts):
        value = digits = 0
        while True:
            if p == len(counts) or digits == 7 or not 48 <= counts[p] <= 111:
                return None
            c = counts[p] - 48
            value |= (c & 0x1F) << (5 * digits)
            p, digits = p + 1, digits + 1
            if not c & 0x20:
                if c & 0x10:
                    value -= 1 << (5 * digits)
                break
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    if not runs or min(runs) < 0 or sum(runs) != h * w:
        return None
    return runs


def _seed_rles(rng: np.random.Generator) -> list:
    out = []
    for h, w in ((1, 1), (7, 5), (16, 16), (31, 24)):
        for density in (0.0, 0.2, 0.5, 1.0):
            mask = np.asfortranarray((rng.random((h, w)) < density).astype(np.uint8))
            out.append((mask_utils.encode(mask)["counts"], h, w))
    return out


def test_mutated_rle_strings_decode_as_pycocotools_or_are_refused():
    rng = np.random.default_rng(SEED)
    seeds = _seed_rles(rng)
    valid = invalid = 0
    for i in range(3000):
        counts, h, w = seeds[i % len(seeds)]
        if i % 4:  # one in four stays as encoded
            counts = mutate(counts, rng)
        rle = {"size": [h, w], "counts": counts}
        if reference_runs(counts, h, w) is None:
            with pytest.raises(RLEError, match=r"invalid RLE \("):
                decode_rles([rle], h, w)
            invalid += 1
        else:
            expected = mask_utils.decode(rle).astype(bool)
            assert np.array_equal(decode_rles([rle], h, w)[0], expected), f"string {i}: {counts!r}"
            valid += 1
    assert valid > 750 and invalid > 1000


# ------------------------------------------------------------------------------------------------ pickles


REFS = [{"ref_id": i, "ann_id": 10 + i, "image_id": i // 2, "split": "train" if i % 3 else "val",
         "sentences": [{"raw": f"the tank {i}", "tokens": ["the", "tank", str(i)], "sent_id": 5 * i}],
         "sent_ids": (5 * i,), "score": 0.5 * i, "flags": {True, None}, "file": b"x.jpg"} for i in range(4)]


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin1")


def _plain(value):
    """What the restricted loader makes of a value (tuples and sets -> lists, bytes -> str, UTF-8 else latin-1)."""
    if isinstance(value, dict):
        return {(_text(k) if isinstance(k, bytes) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return _text(bytes(value))
    return value


def _standard_load(data: bytes):
    """The standard unpickler, with the loader's encodings: UTF-8, else latin-1 for Python 2 byte strings."""
    try:
        return pickle.loads(data, encoding="utf-8")
    except UnicodeDecodeError:
        return pickle.loads(data, encoding="latin1")


class _OneFile:
    """A path manager whose every file holds ``data`` (no disk writes in the loop)."""

    data = b""

    def open(self, path: str, mode: str = "rb"):
        return io.BytesIO(self.data)


def test_mutated_pickles_load_as_pickle_loads_them_or_are_refused():
    rng = np.random.default_rng(SEED)
    seeds = [pickle.dumps(REFS, protocol=p) for p in (0, 2, 4, 5)]
    files, path = _OneFile(), "data/refs(unc).p"
    accepted = refused = 0
    for i in range(2000):
        files.data = mutate(seeds[i % len(seeds)], rng)
        try:
            got = load_plain_pickle(path, path_manager=files)
        except UserError as e:
            assert str(e).startswith(path), str(e)
            refused += 1
            continue
        # accepted: the file asked only for the allowed builtins, so the standard unpickler may read it too
        assert repr(got) == repr(_plain(_standard_load(files.data))), f"mutant {i}"  # repr: NaN == NaN
        accepted += 1
    assert accepted > 100 and refused > 1000


def test_memo_bombs_of_any_shape_are_refused(tmp_path):
    """Shared lists, level after level (the value expands without end), and a memo index far out."""
    path = tmp_path / "refs(unc).p"
    for fan, levels in ((2, 40), (8, 10), (64, 4), (255, 3)):
        value = []
        for _ in range(levels):
            value = [value] * fan
        path.write_bytes(pickle.dumps(value, protocol=2))
        with pytest.raises(UserError, match=r"refused to unpickle: (it expands to more than|containers are nested)"):
            load_plain_pickle(path)
    # a memo index far ahead of the entries written: the C unpickler would allocate and clear a table for it
    path.write_bytes(b"\x80\x02]r\xff\xff\xff\x7f.")
    with pytest.raises(UserError, match=r"memo index 2147483647 at byte 3 runs ahead of the 0 entries"):
        load_plain_pickle(path)

