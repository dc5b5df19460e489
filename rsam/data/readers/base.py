"""What every dataset reader shares: the per-expression record, image access, mask sizes, the reader interface.

A reader knows one on-disk format and nothing else: it lists the images of a split and, for each image, returns
its referring expressions as :class:`Annotation` records whose masks it can decode. Selection, no-target
expressions, transforms and bad-sample policy live in :class:`rsam.data.dataset.ReferringDataset`.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, List, Optional, Sequence, Tuple, Union

import numpy as np
from iopath.common.file_io import PathManager, g_pathmgr
from PIL import Image

from rsam.data.errors import DataError
from rsam.data.readers.pictures import EncodedPicture, decode_rgb, open_picture

__all__ = ["Annotation", "Reader", "raise_error", "resize_nearest", "category_from_text", "drop_zero_area"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Annotation:
    """One referring expression of one image: its text, category and a format-specific mask reference.

    ``index`` is the expression's stable position among the image's expressions (its id in sample ids);
    ``area`` is the mask's pixel count where the format stores or cheaply knows it (``inf`` when only decoding
    tells); ``no_target`` marks an expression stored explicitly without a target (``mask: null``).
    """

    index: int
    description: str
    category: Optional[str]
    area: float
    segmentation: Any
    no_target: bool = False
    source_id: str = ""

    @property
    def empty(self) -> bool:
        return self.no_target or self.area <= 0


def raise_error(err: DataError) -> None:
    raise err


def resize_nearest(masks: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(k,h,w) bool -> (k,H,W) bool, nearest neighbour (pixel centres), as PIL's NEAREST resize does."""
    h, w = masks.shape[-2:]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return np.ascontiguousarray(masks[:, rows][:, :, cols])


def drop_zero_area(annotations: List[Annotation], keep_empty: bool,
                   on_zero_area: Optional[Callable[[], None]]) -> List[Annotation]:
    """The format rule for stored masks with no pixel: dropped (``on_zero_area`` called for each) unless
    ``keep_empty``. Explicit no-target expressions (``no_target``) are always kept."""
    if keep_empty:
        return list(annotations)
    out = []
    for ann in annotations:
        if ann.area <= 0 and not ann.no_target:
            if on_zero_area is not None:
                on_zero_area()
            continue
        out.append(ann)
    return out


def category_from_text(text: str, names: Sequence[str]) -> Optional[str]:
    """The class name that occurs first in ``text`` (whole words, case-insensitive; at the same position the
    longer name wins, so "road marking" beats "road"), or None. A heuristic for formats that store no category."""
    best: Optional[Tuple[int, int, str]] = None
    lowered = text.lower()
    for name in names:
        m = re.search(rf"\b{re.escape(name.lower())}s?\b", lowered)
        if m and (best is None or (m.start(), -len(name)) < (best[0], best[1])):
            best = (m.start(), -len(name), name)
    return None if best is None else best[2]


class Reader:
    """The interface of a format reader, with the image handling they share.

    Subclasses set ``format``, fill ``self.names`` (the split's image keys) and ``self.where`` (the file that
    lists the split, for messages), and implement :meth:`image_path`, :meth:`annotation_path`,
    :meth:`load_annotations`, :meth:`decode_stored_masks` and :meth:`available_splits`; :meth:`mask_size` when
    the stored mask size is known without decoding.
    """

    format: ClassVar[str] = ""
    # True where a release is known to pair images with masks of another size (RRSIS-D): masks are resized to
    # the image (nearest) and each case is reported; elsewhere a size mismatch is bad input.
    resize_masks: ClassVar[bool] = False

    def __init__(self, root: str, split: Optional[str], path_manager: Optional[PathManager] = None):
        self.root = str(root).rstrip("/")
        self.split = split
        self.pm = path_manager or g_pathmgr
        self.names: List[str] = []
        self.where = self.root
        self.problems: List[DataError] = []  # construction-time problems of records no image can own

    # -------------------------------------------------------------------------------------------- per format
    @classmethod
    def available_splits(cls, root: str, **options) -> List[str]:
        raise NotImplementedError

    def image_path(self, name: str) -> str:
        raise NotImplementedError

    def annotation_path(self, name: str) -> str:
        """The file named in errors about this image's expressions."""
        raise NotImplementedError

    def load_annotations(self, name: str, on_bad_record: Callable[[DataError], None] = raise_error,
                         keep_empty: bool = False, on_zero_area: Optional[Callable[[], None]] = None
                         ) -> List[Annotation]:
        raise NotImplementedError

    def decode_stored_masks(self, name: str, annotations: Sequence[Annotation]) -> List[np.ndarray]:
        """Each annotation's mask as stored: bool (h,w) arrays (sizes may differ from the image)."""
        raise NotImplementedError

    def mask_size(self, name: str, ann: Annotation) -> Optional[Tuple[int, int]]:
        """The stored mask's (h, w) when known without decoding, else None."""
        return None

    # -------------------------------------------------------------------------------------------- shared
    def __getstate__(self) -> dict:
        # The global PathManager is re-attached on unpickling (spawned dataloader workers).
        state = dict(self.__dict__)
        if state["pm"] is g_pathmgr:
            state["pm"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.pm is None:
            self.pm = g_pathmgr

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_bytes(self, path: str, kind: str) -> bytes:
        try:
            with self.pm.open(path, "rb") as f:
                return f.read()
        except OSError as e:  # FileNotFoundError included
            raise DataError(path, f"cannot read {kind} file ({e})", "missing_file") from None

    def read_text_lines(self, path: str, kind: str) -> List[Tuple[int, Optional[str]]]:
        """(line number, text) of a UTF-8 text file, line ends stripped. A line that is not UTF-8 comes as
        (number, None) after its DataError went to ``self.problems``: one bad line never hides the others."""
        raw = self.read_bytes(path, kind)
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        out: List[Tuple[int, Optional[str]]] = []
        for number, line in enumerate(raw.splitlines(), 1):
            try:
                out.append((number, line.decode("utf-8")))
            except UnicodeDecodeError as e:
                self.problems.append(DataError(path, f"line {number} is not UTF-8 text ({e.reason} at byte "
                                                     f"{e.start})", "description"))
                out.append((number, None))
        return out

    def files_of(self, name: str) -> List[str]:
        """Files an image needs (checked by :meth:`missing_files`)."""
        return [self.image_path(name)]

    def missing_files(self, names: Sequence[str]) -> List[Tuple[str, str]]:
        """(name, path) of every file an image needs that does not exist."""

        def check(name: str) -> List[Tuple[str, str]]:
            return [(name, p) for p in self.files_of(name) if not self.pm.exists(p)]

        with ThreadPoolExecutor(8) as pool:
            return [m for ms in pool.map(check, names) for m in ms]

    def open_image(self, name: str) -> EncodedPicture:
        """Open the image lazily (header only): ``.size`` is known, pixels are decoded by :meth:`decode_image`."""
        return self.open_picture(self.image_path(name), "image")

    def open_picture(self, path: str, kind: str) -> EncodedPicture:
        return open_picture(path, self.read_bytes(path, kind), kind)

    def decode_image(self, name: str, image: EncodedPicture, draft_size: Optional[int] = None
                     ) -> Union[np.ndarray, Image.Image]:
        """Decode pixels to RGB: uint8 (H,W,3) or a PIL RGB image (see :func:`decode_rgb` and ``draft_size``)."""
        return decode_rgb(image, draft_size)

    def size_mismatch(self, name: str, ann: Annotation, size: Tuple[int, int]) -> Optional[DataError]:
        """The error for an annotation whose stored mask size differs from the image's (h, w); None when they
        agree, when the size is only known after decoding, or when this format resizes masks."""
        stored = self.mask_size(name, ann)
        if stored is None or tuple(stored) == tuple(size) or self.resize_masks:
            return None
        return DataError(self.annotation_path(name), f"expression {ann.index}: mask size {list(stored)} != image "
                                                     f"size {list(size)} of {self.image_path(name)}", "size")

    def decode_masks(self, name: str, annotations: Sequence[Annotation], size: Tuple[int, int]) -> np.ndarray:
        """Masks of ``annotations`` at the image size ``size`` = (h, w) -> bool (k,H,W), C-contiguous."""
        if not annotations:
            return np.zeros((0, *size), dtype=bool)
        out = np.empty((len(annotations), *size), dtype=bool)
        for i, (ann, mask) in enumerate(zip(annotations, self.decode_stored_masks(name, annotations))):
            if mask.shape != tuple(size):
                if not self.resize_masks:
                    raise DataError(self.annotation_path(name), f"expression {ann.index}: mask size "
                                    f"{list(mask.shape)} != image size {list(size)} of {self.image_path(name)}",
                                    "size")
                self.report_resize(name, mask.shape, size)
                mask = resize_nearest(mask[None], size)[0]
            out[i] = mask
        return out

    _resize_reported: ClassVar[set] = set()

    def report_resize(self, name: str, mask_size: Tuple[int, int], size: Tuple[int, int]) -> None:
        """Log each image whose masks are resized to it (once per image and process)."""
        key = (self.root, name)
        if key not in Reader._resize_reported:
            Reader._resize_reported.add(key)
            log.warning("%s: mask %s resized to the image size %s (nearest; a known defect of the %s release)",
                        self.image_path(name), list(mask_size), list(size), self.format)
