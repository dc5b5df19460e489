"""COCO run-length encoding: every RLE checked here before pycocotools sees it, then decoded by pycocotools.

COCO RLEs are column-major run lengths starting with a background run. The compressed form packs each value
into characters '0'..'o' (5 data bits each, offset 48; 0x20 = another character follows, 0x10 in the last one =
negative), and from the third run on stores the difference to the run two before.

pycocotools' C parser trusts its input: it reads past a NUL that follows a continuation character (a heap
overflow), and it writes masks from runs that need not add up to the mask. So :func:`check_rle` parses every
string (and every uncompressed counts list) in numpy first and refuses it unless each character is in the
alphabet, each value ends inside the string, no run is negative and the runs add up to exactly height x width.
Every path to pycocotools in RSAM goes through this module: :func:`decode_rles`, :func:`rle_area`,
:func:`compress_counts`, :func:`polygons_to_rle` and :func:`encode_rle` (the predictor's output).
"""
from __future__ import annotations

import math
from typing import List, Mapping, Sequence, Tuple, Union

import numpy as np
from pycocotools import mask as mask_utils

from rsam.data.limits import MAX_PICTURE_PIXELS

__all__ = ["RLEError", "check_size", "check_rle", "rle_area", "decode_rles", "compress_counts", "polygons_to_rle",
           "encode_rle"]

Counts = Union[str, bytes, List[int]]

# A run is at most MAX_PICTURE_PIXELS < 2**32 (pycocotools stores runs as uint32); with its sign, a stored value
# (a run, or the difference of two) needs at most 34 bits: 7 characters of 5 bits.
_MAX_VALUE_CHARS = 7
_FIRST, _LAST = ord("0"), ord("0") + 63
# A polygon's outline is rasterised point by point (pycocotools allocates one entry per pixel of outline): the
# outlines of one annotation may not be longer than this many times the picture's height + width.
_MAX_OUTLINE_PER_SIDE = 1000


class RLEError(ValueError):
    """An RLE that does not decode; ``positions`` are its indices in the list given to :func:`decode_rles`."""

    def __init__(self, positions: List[int], problem: str, wrong_size: bool = False):
        super().__init__(f"rle {positions}: {problem}")
        self.positions, self.problem, self.wrong_size = positions, problem, wrong_size

    def __reduce__(self):  # picklable across processes despite the 3-argument constructor
        return (RLEError, (self.positions, self.problem, self.wrong_size))


def check_size(size) -> Tuple[int, int]:
    """``[h, w]`` of an RLE -> (h, w). Raises ValueError unless both are positive integers and the mask is at most
    ``MAX_PICTURE_PIXELS`` (rsam/data/limits.py)."""
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size must be [height, width], two positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h * w > MAX_PICTURE_PIXELS:
        raise ValueError(f"size {h}x{w} is over the limit of {MAX_PICTURE_PIXELS} pixels for a dataset mask")
    return h, w


def _runs_of_string(counts: bytes, pixels: int) -> np.ndarray:
    """The run lengths of a compressed counts string, each checked; raises ValueError saying what is wrong."""
    if not counts:
        raise ValueError("the counts string is empty")
    if len(counts) > _MAX_VALUE_CHARS * (pixels + 1):
        raise ValueError(f"the counts string has {len(counts)} characters, more than any {pixels}-pixel mask needs")
    codes = np.frombuffer(counts, np.uint8)
    outside = np.flatnonzero((codes < _FIRST) | (codes > _LAST))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"character {counts[i:i + 1]!r} at position {i} is not in the RLE alphabet '0'..'o'")
    c = codes.astype(np.int64) - _FIRST
    ends = np.flatnonzero((c & 0x20) == 0)  # the last character of each value
    if ends.size == 0 or ends[-1] != len(counts) - 1:
        raise ValueError("the last value is not terminated (the string is cut short)")
    starts = np.concatenate(([0], ends[:-1] + 1))
    chars = ends - starts + 1
    if chars.max() > _MAX_VALUE_CHARS:
        j = int(np.argmax(chars))
        raise ValueError(f"value {j} spans {int(chars[j])} characters; no count of a mask needs more than "
                         f"{_MAX_VALUE_CHARS}")
    digit = np.arange(len(c)) - np.repeat(starts, chars)
    values = np.add.reduceat((c & 0x1F) << (5 * digit), starts)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * chars[negative])  # the sign bit extends over the upper bits
    runs = values.copy()  # from the third run on, each value is the difference to the run two before
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _checked_runs(runs: np.ndarray, h: int, w: int) -> int:
    """Foreground pixels of run lengths ``runs`` for an h x w mask; raises ValueError unless they tile it."""
    negative = np.flatnonzero(runs < 0)
    if negative.size:
        raise ValueError(f"run {int(negative[0])} is negative ({int(runs[negative[0]])})")
    total = int(runs.sum())
    if total != h * w:
        raise ValueError(f"the runs add up to {total} pixels, a {h}x{w} mask has {h * w}")
    return int(runs[1::2].sum())


def check_rle(counts: Counts, h: int, w: int) -> int:
    """Check an RLE's counts (compressed str / bytes, or an uncompressed list of runs) for an h x w mask (sizes
    from :func:`check_size`) -> its foreground pixel count. Raises ValueError saying what is wrong."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError(f"character {e.object[e.start]!r} at position {e.start} is not in the RLE alphabet "
                             "'0'..'o'") from None
    if isinstance(counts, bytes):
        return _checked_runs(_runs_of_string(counts, h * w), h, w)
    if isinstance(counts, list):
        bad = next((i for i, v in enumerate(counts) if not isinstance(v, int) or isinstance(v, bool)
                    or not 0 <= v <= h * w), None)
        if bad is not None:
            raise ValueError(f"counts[{bad}] = {counts[bad]!r} is not a run length (an integer 0..{h * w})")
        return _checked_runs(np.asarray(counts, np.int64), h, w)
    raise ValueError(f"counts must be a string or a list of run lengths, got {type(counts).__name__}")


def rle_area(rle: Mapping) -> int:
    """Foreground pixels of a checked ``{"size": [h, w], "counts": ...}`` RLE. Raises ValueError."""
    h, w = check_size(rle.get("size"))
    return check_rle(rle.get("counts"), h, w)


def compress_counts(counts: List[int], h: int, w: int) -> dict:
    """An uncompressed RLE (a list of runs) -> ``{"size": [h, w], "counts": bytes}``, checked first."""
    check_rle(counts, h, w)
    return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)


def _check_polygons(polygons: list, h: int, w: int) -> None:
    reach = h + w  # coordinates may stray outside the picture, but not far
    outline = 0.0
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise ValueError(f"polygon {k} must be a list of at least 3 x, y pairs")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   and -reach <= v <= 2 * reach for v in poly):
            raise ValueError(f"polygon {k} has a coordinate that is not a number within {-reach}..{2 * reach}")
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        outline += float(np.abs(xy - np.roll(xy, 1, axis=0)).max(axis=1).sum())
    if outline > _MAX_OUTLINE_PER_SIDE * reach:
        raise ValueError(f"the polygons' outlines are {outline:.0f} px long, over {_MAX_OUTLINE_PER_SIDE} x "
                         f"(height + width)")


def polygons_to_rle(polygons: list, h: int, w: int) -> dict:
    """COCO polygons (lists of x, y) of an h x w picture -> their union as one compressed RLE, checked first."""
    if not polygons:
        raise ValueError("no polygon")
    _check_polygons(polygons, h, w)
    return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))


def decode_rles(segmentations: Sequence[Mapping], height: int, width: int) -> np.ndarray:
    """``{"size": [h, w], "counts": bytes | str | list[int]}`` RLEs, all (height, width) -> bool (k, H, W),
    C-contiguous. Each is checked (:func:`check_rle`) before pycocotools decodes them.

    Raises :class:`RLEError` with the position of the invalid RLE.
    """
    if not segmentations:
        return np.zeros((0, height, width), bool)
    compressed = []
    for i, seg in enumerate(segmentations):
        size = seg.get("size")
        if not isinstance(size, (list, tuple)) or [*size] != [height, width]:
            raise RLEError([i], f"size {size!r} != {[height, width]}", wrong_size=True)
        counts = seg.get("counts")
        try:
            h, w = check_size(size)
            check_rle(counts, h, w)
        except ValueError as e:
            raise RLEError([i], f"invalid RLE ({e})") from None
        if isinstance(counts, list):
            compressed.append(mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w))
        else:
            compressed.append({"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    decoded = mask_utils.decode(compressed)  # (H, W, k) uint8, column-major
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).view(bool)


def encode_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> compressed COCO RLE ``{"size": [h, w], "counts": str}``, checked like any RLE read."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    out = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    check_rle(out["counts"], *out["size"])
    return out
