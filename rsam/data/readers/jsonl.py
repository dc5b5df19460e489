"""The ``jsonl`` format: ours, for custom data and the output of ``rsam-data convert``.

``<root>/manifest.jsonl`` holds one JSON object per expression::

    {"image": "images/a.jpg",              # relative to root, or absolute
     "height": 800, "width": 800,          # the image's size
     "split": "train",                     # any name
     "text": "the white storage tank at the bottom left",
     "mask": {"size": [800, 800], "counts": "<compressed COCO RLE>"},   # or null: no target
     "category": "storage tank",           # or null
     "source": {"dataset": "rrsisd", "id": "ref 12 sent 31"}}

Expressions of the same ``image`` and ``split`` are one image's expressions.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from iopath.common.file_io import PathManager

from rsam.data.errors import DataError
from rsam.data.readers.base import Annotation, Reader, drop_zero_area, raise_error
from rsam.data.rle import RLEError, decode_rles, rle_area

__all__ = ["JsonlReader", "MANIFEST"]

MANIFEST = "manifest.jsonl"


def _parse_line(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a {type(obj).__name__}, expected an object")
    for key, kind in (("image", str), ("split", str), ("text", str), ("height", int), ("width", int)):
        if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
            raise ValueError(f"{where}.{key} must be a {kind.__name__}, got {obj.get(key)!r}")
    if not obj["text"].strip():
        raise ValueError(f"{where}.text is empty")
    mask = obj.get("mask")
    if mask is not None:
        if not (isinstance(mask, dict) and isinstance(mask.get("counts"), str) and isinstance(mask.get("size"), list)):
            raise ValueError(f"{where}.mask must be null or {{'size': [h, w], 'counts': <compressed RLE str>}}")
        if mask["size"] != [obj["height"], obj["width"]]:
            raise ValueError(f"{where}.mask.size {mask['size']} != [height, width] {[obj['height'], obj['width']]}")
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise ValueError(f"{where}.category must be a string or null")
    if obj.get("source") is not None and not isinstance(obj["source"], dict):
        raise ValueError(f"{where}.source must be an object {{'dataset': ..., 'id': ...}} or absent")
    return obj


class JsonlReader(Reader):
    """One split of a ``manifest.jsonl`` dataset (see the module docstring)."""

    format = "jsonl"

    def __init__(self, root: str, split: Optional[str] = "train", manifest: str = MANIFEST,
                 path_manager: Optional[PathManager] = None):
        super().__init__(root, split, path_manager)
        self.where = manifest if os.path.isabs(manifest) or "://" in manifest else self.join(manifest)
        self._expressions: Dict[str, List[Tuple[dict, int]]] = {}
        splits = set()
        for number, line in self.read_text_lines(self.where, "manifest"):
            if line is None or not line.strip():
                continue
            try:
                obj = _parse_line(json.loads(line), f"line {number}")
            except json.JSONDecodeError as e:
                self.problems.append(DataError(self.where, f"line {number}: malformed JSON ({e})", "json"))
                continue
            except ValueError as e:
                self.problems.append(DataError(self.where, str(e), "field"))
                continue
            splits.add(obj["split"])
            if split is None or obj["split"] == split:
                self._expressions.setdefault(obj["image"], []).append((obj, number))
        if split is not None and split not in splits and not self.problems:
            raise DataError(self.where, f"no expression has split {split!r}; the splits are {sorted(splits)}", "field")
        self.names = sorted(self._expressions)

    @classmethod
    def available_splits(cls, root: str, manifest: str = MANIFEST, path_manager: Optional[PathManager] = None,
                         **_) -> List[str]:
        reader = cls(root, None, manifest, path_manager)
        return sorted({obj["split"] for exprs in reader._expressions.values() for obj, _ in exprs})

    def image_path(self, name: str) -> str:
        return name if os.path.isabs(name) or "://" in name else self.join(name)

    def annotation_path(self, name: str) -> str:
        return self.where

    def load_annotations(self, name: str, on_bad_record: Callable[[DataError], None] = raise_error,
                         keep_empty: bool = False, on_zero_area: Optional[Callable[[], None]] = None
                         ) -> List[Annotation]:
        out = []
        for index, (obj, number) in enumerate(self._expressions[name]):
            mask = obj.get("mask")
            if mask is None:
                area, seg = 0.0, None
            else:
                try:
                    area = float(rle_area(mask))
                except ValueError as e:
                    on_bad_record(DataError(self.where, f"line {number}.mask: {e}", "field"))
                    continue
                seg = {"size": list(mask["size"]), "counts": mask["counts"].encode("ascii"), "line": number}
            source = obj.get("source") or {}
            ann = Annotation(index, obj["text"].strip(), obj.get("category"), area, seg, no_target=mask is None,
                             source_id=f"{source.get('dataset', '')}:{source.get('id', number)}")
            out.append(ann)
        return drop_zero_area(out, keep_empty, on_zero_area)

    def mask_size(self, name: str, ann: Annotation) -> Optional[Tuple[int, int]]:
        return None if ann.segmentation is None else tuple(ann.segmentation["size"])

    def decode_stored_masks(self, name: str, annotations: Sequence[Annotation]) -> List[np.ndarray]:
        masks = []
        for ann in annotations:
            h, w = ann.segmentation["size"]
            try:
                masks.append(decode_rles([ann.segmentation], h, w)[0])
            except RLEError as e:
                raise DataError(self.where, f"line {ann.segmentation['line']}.mask: {e.problem}", "field") from None
        return masks
