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

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from iopath.common.file_io import PathManager, g_pathmgr
from PIL import Image

from rsam.data.errors import DataError
from rsam.data.rle import RLEError, decode_rles

__all__ = ["SPLITS", "Annotation", "RISORSReader"]

SPLITS = ("train", "val", "test")
_KNOWN_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".json")


@dataclass(frozen=True)
class Annotation:
    """One validated annotation record (mask still RLE-encoded)."""

    index: int  # position in the file's "annotations" list
    description: str
    category: str
    area: float
    segmentation: dict  # {"size": [h, w], "counts": bytes | list[int]}

    @property
    def empty(self) -> bool:
        return self.area <= 0


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
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise DataError(path, f"{where}.segmentation.size must be [h, w] positive integers, got {size!r}", "field")
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    elif not isinstance(counts, (bytes, list)):
        raise DataError(path, f"{where}.segmentation.counts must be a string, bytes or a list", "field")
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


def _raise(err: DataError) -> None:
    raise err


class RISORSReader:
    """File access and parsing for one RISORS split (no randomness, no transforms).

    Args:
        root: dataset root (local path or iopath URI).
        split: ``"train"``, ``"val"``, ``"test"`` (reads ``RISORS_<split>.txt``) or ``None`` (every ``*.jpg``).
        file_list: explicit split list, overrides ``split``.
        path_manager: iopath ``PathManager`` (default: the global one).
    """

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        file_list: Optional[str] = None,
        path_manager: Optional[PathManager] = None,
    ):
        self.root = root.rstrip("/")
        self.pm = path_manager or g_pathmgr
        if file_list is None and split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
            file_list = self.join(f"RISORS_{split}.txt")
        self.file_list = file_list
        self.names = self.read_file_list(file_list) if file_list is not None else self.list_images()

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

    def image_path(self, name: str) -> str:
        return self.join("JPEGImages", f"{name}.jpg")

    def annotation_path(self, name: str) -> str:
        return self.join("Annotations", f"{name}.json")

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

    def missing_files(self, names: Sequence[str]) -> List[Tuple[str, str]]:
        """(name, path) of every image or annotation file that does not exist."""

        def check(name: str) -> List[Tuple[str, str]]:
            return [(name, p) for p in (self.image_path(name), self.annotation_path(name)) if not self.pm.exists(p)]

        with ThreadPoolExecutor(8) as pool:
            return [m for ms in pool.map(check, names) for m in ms]

    def _read_bytes(self, path: str, kind: str) -> bytes:
        try:
            with self.pm.open(path, "rb") as f:
                return f.read()
        except OSError as e:  # FileNotFoundError included
            raise DataError(path, f"cannot read {kind} file ({e})", "missing_file") from None

    def size_mismatch(self, name: str, ann: Annotation, size: Tuple[int, int]) -> Optional[DataError]:
        """The error for an annotation whose RLE size differs from the image's (h, w), or None if they agree."""
        if ann.segmentation["size"] == list(size):
            return None
        return DataError(
            self.annotation_path(name),
            f"annotations[{ann.index}].segmentation.size {ann.segmentation['size']} != image size "
            f"{list(size)} of {self.image_path(name)}",
            "size",
        )

    def load_annotations(
        self,
        name: str,
        on_bad_record: Callable[[DataError], None] = _raise,
        keep_empty: bool = False,
        on_zero_area: Optional[Callable[[], None]] = None,
    ) -> List[Annotation]:
        """Parse ``Annotations/<name>.json``.

        File-level problems raise :class:`DataError`; a bad record goes to ``on_bad_record`` (raise by default,
        or record-and-skip). Records with ``area <= 0`` are dropped (``on_zero_area`` called for each) unless
        ``keep_empty``.
        """
        path = self.annotation_path(name)
        raw = self._read_bytes(path, "annotation")
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
            if ann.empty and not keep_empty:
                if on_zero_area is not None:
                    on_zero_area()
                continue
            out.append(ann)
        return out

    def open_image(self, name: str) -> Image.Image:
        """Open the image lazily (header only): ``.size`` is known, pixels are decoded by :meth:`decode_image`."""
        path = self.image_path(name)
        raw = self._read_bytes(path, "image")
        try:
            return Image.open(io.BytesIO(raw))
        except Exception as e:  # PIL raises several types for unknown/corrupt headers
            raise DataError(path, f"unreadable image ({type(e).__name__}: {e})", "image") from None

    def decode_image(self, name: str, image: Image.Image, draft_size: Optional[int] = None) -> Image.Image:
        """Decode pixels to RGB. ``draft_size`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the network
        resolution is that much smaller than the file (a large saving at demo resolutions, none at 800 px)."""
        try:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
        except Exception as e:
            raise DataError(self.image_path(name), f"corrupt image data ({type(e).__name__}: {e})", "image") from None

    def decode_masks(self, name: str, annotations: Sequence[Annotation]) -> np.ndarray:
        """Decode the RLEs of ``annotations`` (all of one image size) -> bool (k,H,W), C-contiguous."""
        if not annotations:
            raise ValueError("decode_masks needs at least one annotation")
        h, w = annotations[0].segmentation["size"]
        try:
            return decode_rles([a.segmentation for a in annotations], h, w)
        except RLEError as e:
            records = [annotations[j].index for j in e.positions]
            where = f"annotations[{records[0]}]" if len(records) == 1 else f"annotations {records}"
            if e.wrong_size:
                problem = f".segmentation.size {annotations[e.positions[0]].segmentation['size']} != {[h, w]} " \
                          f"(annotations[{annotations[0].index}].segmentation.size)"
            else:
                problem = f".segmentation: {e.problem}"
            raise DataError(self.annotation_path(name), where + problem, "size" if e.wrong_size else "field") from None
