"""The RISORS format: file layout, annotation records, and reading them (no randomness, no transforms).

On-disk layout (any iopath URI works as ``root``)::

    <root>/JPEGImages/<name>.jpg
    <root>/Annotations/<name>.json      {"annotations": [{"segmentation": {"size": [h, w], "counts": ...},
                                                         "area": float, "description": str, "name": str}, ...]}
    <root>/RISORS_{train,val,test}.txt  one image name per line (whitespace and extension stripped)

One annotation record = one referring expression = one (expression, mask) pair. Records with ``area <= 0`` are
skipped, as in the official reader, unless the dataset keeps them as in-image no-target expressions.
"""
from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from iopath.common.file_io import PathManager, g_pathmgr

from rsam.data.errors import DataError
from rsam.data.readers.base import Annotation, Reader, drop_zero_area, raise_error
from rsam.data.rle import RLEError, check_rle, check_size, decode_rles

__all__ = ["SPLITS", "RISORSReader"]

SPLITS = ("train", "val", "test")
_KNOWN_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".json")


def _strip_name(line: str) -> str:
    name = line.strip()
    root, ext = os.path.splitext(name)
    return root if ext.lower() in _KNOWN_EXTENSIONS else name


def _parse_record(rec, index: int, path: str) -> Annotation:
    """Validate one JSON record; raises DataError naming the field."""
    where = f"annotations[{index}]"
    if not isinstance(rec, dict):
        raise DataError(path, f"{where} is a {type(rec).__name__}, expected an object", "field")
    for key in ("segmentation", "area", "description", "name"):
        if key not in rec:
            raise DataError(path, f"{where} has no '{key}' field", "field")
    seg = rec["segmentation"]
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise DataError(path, f"{where}.segmentation must be a COCO RLE object with 'size' and 'counts'", "field")
    try:
        size = check_size(seg["size"])
    except ValueError as e:
        raise DataError(path, f"{where}.segmentation.{e}", "field") from None
    counts = seg["counts"]
    try:  # here, not when the mask is decoded: one bad record is reported and skipped, the others are kept
        check_rle(counts, *size)
    except ValueError as e:
        raise DataError(path, f"{where}.segmentation.counts: {e}", "field") from None
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    area = rec["area"]
    if isinstance(area, bool) or not isinstance(area, (int, float)):
        raise DataError(path, f"{where}.area must be a number, got {area!r}", "field")
    desc, cat = rec["description"], rec["name"]
    if not isinstance(desc, str):
        raise DataError(path, f"{where}.description must be a string, got {type(desc).__name__}", "field")
    if not desc.strip():
        raise DataError(path, f"{where}.description is empty", "description")
    if not isinstance(cat, str) or not cat.strip():
        raise DataError(path, f"{where}.name (category) must be a non-empty string, got {cat!r}", "field")
    return Annotation(index, desc, cat, float(area), {"size": [size[0], size[1]], "counts": counts})


class RISORSReader(Reader):
    """The RISORS format for one split.

    Args:
        root: dataset root (local path or iopath URI).
        split: ``"train"``, ``"val"``, ``"test"`` (reads ``RISORS_<split>.txt``) or ``None`` (every ``*.jpg``).
        file_list: explicit split list, overrides ``split``.
        path_manager: iopath ``PathManager`` (default: the global one).
    """

    format = "risors"

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        file_list: Optional[str] = None,
        path_manager: Optional[PathManager] = None,
    ):
        super().__init__(root, split, path_manager)
        if file_list is None and split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
            file_list = self.join(f"RISORS_{split}.txt")
        self.file_list = file_list
        self.names = self.read_file_list(file_list) if file_list is not None else self.list_images()
        self.where = file_list or self.join("JPEGImages")

    @classmethod
    def available_splits(cls, root: str, path_manager: Optional[PathManager] = None, **_) -> List[str]:
        pm = path_manager or g_pathmgr
        found = [s for s in SPLITS if pm.exists(f"{str(root).rstrip('/')}/RISORS_{s}.txt")]
        if not found:
            raise DataError(str(root), f"not a RISORS dataset: no RISORS_{{{','.join(SPLITS)}}}.txt split list",
                            "missing_file")
        return found

    def image_path(self, name: str) -> str:
        return self.join("JPEGImages", f"{name}.jpg")

    def annotation_path(self, name: str) -> str:
        return self.join("Annotations", f"{name}.json")

    def files_of(self, name: str) -> List[str]:
        return [self.image_path(name), self.annotation_path(name)]

    def read_file_list(self, path: str) -> List[str]:
        if not self.pm.exists(path):
            raise FileNotFoundError(f"{path}: split list not found")
        with self.pm.open(path, "r") as f:
            names = [_strip_name(line) for line in f]
        names = [n for n in names if n]
        if not names:
            raise DataError(path, "split list is empty", "missing_file")
        return names

    def list_images(self) -> List[str]:
        folder = self.join("JPEGImages")
        if not self.pm.isdir(folder):
            raise FileNotFoundError(f"{folder}: image folder not found")
        return sorted(os.path.splitext(f)[0] for f in self.pm.ls(folder) if f.lower().endswith(".jpg"))

    def mask_size(self, name: str, ann: Annotation) -> Optional[Tuple[int, int]]:
        return tuple(ann.segmentation["size"])

    def size_mismatch(self, name: str, ann: Annotation, size: Tuple[int, int]) -> Optional[DataError]:
        if ann.segmentation["size"] == list(size):
            return None
        return DataError(self.annotation_path(name), f"annotations[{ann.index}].segmentation.size "
                         f"{ann.segmentation['size']} != image size {list(size)} of {self.image_path(name)}", "size")

    def load_annotations(
        self,
        name: str,
        on_bad_record: Callable[[DataError], None] = raise_error,
        keep_empty: bool = False,
        on_zero_area: Optional[Callable[[], None]] = None,
    ) -> List[Annotation]:
        """Parse ``Annotations/<name>.json``.

        File-level problems raise :class:`DataError`; a bad record goes to ``on_bad_record`` (raise by default,
        or record-and-skip). Records with ``area <= 0`` are dropped (``on_zero_area`` called for each) unless
        ``keep_empty``.
        """
        path = self.annotation_path(name)
        raw = self.read_bytes(path, "annotation")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(path, f"malformed JSON ({e})", "json") from None
        if not isinstance(data, dict) or "annotations" not in data:
            raise DataError(path, "no top-level 'annotations' field", "field")
        records = data["annotations"]
        if not isinstance(records, list):
            raise DataError(path, "'annotations' must be a list", "field")
        out = []
        for i, rec in enumerate(records):
            try:
                ann = _parse_record(rec, i, path)
            except DataError as e:
                on_bad_record(e)
                continue
            out.append(ann)
        return drop_zero_area(out, keep_empty, on_zero_area)

    def decode_masks(self, name: str, annotations: Sequence[Annotation], size: Tuple[int, int]) -> np.ndarray:
        """All RLEs of an image decode in one call (they share the image size, which :meth:`size_mismatch`
        checked) -> bool (k,H,W), C-contiguous."""
        if not annotations:
            return np.zeros((0, *size), dtype=bool)
        h, w = size
        try:
            return decode_rles([a.segmentation for a in annotations], h, w)
        except RLEError as e:
            records = [annotations[j].index for j in e.positions]
            where = f"annotations[{records[0]}]" if len(records) == 1 else f"annotations {records}"
            if e.wrong_size:
                problem = f".segmentation.size {annotations[e.positions[0]].segmentation['size']} != image size " \
                          f"{[h, w]}"
            else:
                problem = f".segmentation: {e.problem}"
            raise DataError(self.annotation_path(name), where + problem, "size" if e.wrong_size else "field") from None
