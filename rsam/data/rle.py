"""COCO run-length encoding: decoding compressed / uncompressed RLEs into boolean masks, and encoding them.

COCO RLEs are column-major run lengths starting with a background run; the compressed form packs them into
a string (5 data bits per character, offset 48). Compressed strings are decoded by the C extension
``rsam._rle`` (rsam/csrc/coco_rle.c) straight into row-major masks. Where it is not built, short strings are
decoded here in numpy (a few slice writes per object) and long ones by pycocotools; uncompressed (list) RLEs
always take the numpy path.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

try:
    from rsam import _rle
except ImportError:  # built by setup.py when a C compiler is found; numpy + pycocotools are the fallback
    _rle = None

__all__ = ["RLEError", "rle_counts", "fill_rle", "decode_rles", "encode_rle", "FAST_RLE_MAX_CHARS"]


class RLEError(ValueError):
    """An RLE that does not decode; ``positions`` are its indices in the list given to :func:`decode_rles`."""

    def __init__(self, positions: List[int], problem: str, wrong_size: bool = False):
        super().__init__(f"rle {positions}: {problem}")
        self.positions, self.problem, self.wrong_size = positions, problem, wrong_size

    def __reduce__(self):  # picklable across processes despite the 3-argument constructor
        return (RLEError, (self.positions, self.problem, self.wrong_size))


# Without rsam._rle, compressed RLE strings up to this length are decoded by rle_counts + fill_rle (a few hundred
# column slices for a typical object, ~3x faster than pycocotools' byte loop plus the transpose its column-major
# output needs); longer ones (very fragmented masks) go to pycocotools, whose cost does not grow with the number
# of runs.
FAST_RLE_MAX_CHARS = 1500


def rle_counts(counts: bytes) -> List[int]:
    """Run lengths of a compressed COCO RLE string (column-major, starting with a background run).

    The COCO code: 5 data bits per character (offset 48), 0x20 = another character follows, 0x10 in the last
    character = negative; from the third run on, each value is stored as the difference to the run two before.
    """
    runs: List[int] = []
    p, n = 0, len(counts)
    while p < n:
        x = k = 0
        while True:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def fill_rle(runs: Sequence[int], out: np.ndarray) -> None:
    """Paint column-major run lengths into a row-major bool mask ``out`` (H,W) that is all False.

    Every foreground run is cut at column boundaries into vertical segments, each written as one slice.
    """
    h, w = out.shape
    lengths = np.asarray(runs, dtype=np.int64)
    if (lengths < 0).any() or int(lengths.sum()) != h * w:
        raise ValueError(f"run lengths sum to {int(lengths.sum())} (negative: {bool((lengths < 0).any())}) for a {h}x{w} mask")
    ends = np.cumsum(lengths)
    start, end = (ends - lengths)[1::2], ends[1::2]  # foreground runs: [start, end) in column-major order
    nonempty = end > start
    start, end = start[nonempty], end[nonempty]
    first_col, last_col = start // h, (end - 1) // h
    pieces = last_col - first_col + 1
    run = np.repeat(np.arange(len(start)), pieces)
    offset = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    col = first_col[run] + offset
    row0 = np.where(offset == 0, start[run] - col * h, 0)
    row1 = np.where(col == last_col[run], end[run] - col * h, h)
    for c, r0, r1 in zip(col.tolist(), row0.tolist(), row1.tolist()):
        out[r0:r1, c] = True


def decode_rles(segmentations: Sequence[Mapping], height: int, width: int) -> np.ndarray:
    """``{"size": [h, w], "counts": bytes | str | list[int]}`` RLEs, all (height, width) -> bool (k, H, W).

    Raises :class:`RLEError` with the position(s) of the invalid RLE.
    """
    out = np.zeros((len(segmentations), height, width), dtype=bool)
    long_rles = []
    for i, seg in enumerate(segmentations):
        if list(seg["size"]) != [height, width]:
            raise RLEError([i], f"size {list(seg['size'])} != {[height, width]}", wrong_size=True)
        counts = seg["counts"]
        if isinstance(counts, str):
            counts = counts.encode("utf-8")
        if _rle is not None and isinstance(counts, bytes):
            try:
                _rle.paint(counts, out[i], height, width)
            except ValueError as e:
                raise RLEError([i], f"invalid RLE ({e})") from None
            continue
        if not isinstance(counts, list) and len(counts) > FAST_RLE_MAX_CHARS:
            long_rles.append((i, counts))
            continue
        try:
            fill_rle(rle_counts(counts) if isinstance(counts, bytes) else counts, out[i])
        except (ValueError, IndexError, OverflowError) as e:  # OverflowError: a run beyond 64 bits
            raise RLEError([i], f"invalid RLE ({e})") from None
    if long_rles:
        try:
            decoded = mask_utils.decode([{"size": [height, width], "counts": c} for _, c in long_rles])
        except Exception as e:  # pycocotools raises bare Exceptions
            raise RLEError([i for i, _ in long_rles], f"invalid RLE ({e})") from None
        out[[i for i, _ in long_rles]] = decoded.transpose(2, 0, 1).view(bool)  # column-major (H,W,k) bytes
    return out


def encode_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
