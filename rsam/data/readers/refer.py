"""REFER-style releases: RRSIS-D (the RMSIN release), RefCOCO-style data and NWPU-Refer.

Layout (``name`` = ``dataset_name``, default ``rrsisd``; ``split_by`` default ``unc``; ``prefix`` default "")::

    <root>/<name>/<prefix>refs(<split_by>).p   Python pickle: a list of refs {ref_id, ann_id, image_id, category_id,
                                               split, file_name, sent_ids, sentences: [{raw, sent, tokens, sent_id}]}
    <root>/<name>/<prefix>instances.json       COCO-like {images: [{id, file_name, height, width}],
                                               annotations: [{id, image_id, segmentation, bbox, area,
                                               categories_id}], categories: [{id, name}]}  (0-based category ids)
    <root>/images/<name>/JPEGImages/<file_name>

Each sentence of a ref is one expression; its category is the ref's ``category_id``. ``segmentation`` may be a
list holding one compressed COCO RLE (the RRSIS-D release), polygons or an uncompressed RLE. The stored ``area``
is wrong in the release and is recomputed from the mask. Several JPEGs of RRSIS-D are 787-802 px on one side
while their masks are 800 x 800: masks are resized to the image (nearest), as the official loaders effectively
do, and each case is reported. NWPU-Refer (``prefix: new_``) gives several refs of one image the same text: with
``shared_text: union`` they are one expression whose target is the union of their objects.

The pickle is read by a restricted unpickler (:mod:`rsam.data.safe_pickle`) and cached as JSON.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from iopath.common.file_io import PathManager

from rsam.data.errors import DataError
from rsam.data.readers.base import Annotation, Reader, drop_zero_area, raise_error
from rsam.data.rle import RLEError, check_rle, check_size, compress_counts, decode_rles, polygons_to_rle, rle_area
from rsam.data.safe_pickle import load_plain_pickle_cached

__all__ = ["ReferReader"]

_REF_KEYS = ("ann_id", "image_id", "category_id", "split", "sentences")


def _rles(segmentation, h: int, w: int) -> Tuple[List[dict], float]:
    """Any COCO segmentation of an h x w image -> (checked RLE dicts with bytes counts, their summed area).
    Raises ValueError saying what is wrong (rsam/data/rle.py checks everything before pycocotools reads it)."""
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if not isinstance(segmentation, list) or not segmentation:
        raise ValueError("segmentation must be a non-empty list or an RLE object")
    if all(isinstance(p, list) for p in segmentation):  # polygons
        rle = polygons_to_rle(segmentation, *check_size([h, w]))
        return [rle], float(rle_area(rle))
    out, area = [], 0
    for rle in segmentation:
        if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
            raise ValueError("an RLE needs 'size' and 'counts'")
        rh, rw = check_size(rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed
            rle = compress_counts(counts, rh, rw)
            counts = rle["counts"]
        area += check_rle(counts, rh, rw)
        out.append({"size": [rh, rw], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    return out, float(area)


class ReferReader(Reader):
    """One split of a REFER-style release (see the module docstring).

    Args:
        root: dataset root; split: a split name present in the refs (e.g. train / val / test, testA).
        dataset_name, split_by, prefix: generalise the paths (``<name>/<prefix>refs(<split_by>).p``).
        shared_text: ``separate`` (every sentence of every ref is one expression) or ``union`` (refs of one image
            with the same text form one multi-object expression).
        cache_dir: where the JSON copy of the pickle goes (default ``$RSAM_CACHE_DIR`` or ~/.cache/rsam).
    """

    format = "rrsisd"
    resize_masks = True

    def __init__(self, root: str, split: Optional[str] = "train", dataset_name: str = "rrsisd",
                 split_by: str = "unc", prefix: str = "", shared_text: str = "separate",
                 cache_dir: Optional[str] = None, path_manager: Optional[PathManager] = None):
        super().__init__(root, split, path_manager)
        if shared_text not in ("separate", "union"):
            raise ValueError(f"shared_text must be 'separate' or 'union', got {shared_text!r}")
        self.dataset_name, self.split_by, self.prefix = dataset_name, split_by, prefix
        self.refs_file = self.join(dataset_name, f"{prefix}refs({split_by}).p")
        self.instances_file = self.join(dataset_name, f"{prefix}instances.json")
        self.where = self.refs_file
        refs = self._read_refs(cache_dir)
        images, anns, categories = self._read_instances()
        self.splits = sorted({r["split"] for r in refs if isinstance(r, dict) and isinstance(r.get("split"), str)})
        if split is not None and split not in self.splits:
            raise DataError(self.refs_file, f"no ref has split {split!r}; the splits are {self.splits}", "field")
        # per image: [(text, category, [ann ids], source id)]
        per_image: Dict[str, List[Tuple[str, Optional[str], List[int], str]]] = {}
        self.image_sizes: Dict[str, Tuple[int, int]] = {}
        for i, ref in enumerate(refs):
            try:
                if split is not None and isinstance(ref, dict) and isinstance(ref.get("split"), str) \
                        and ref["split"] != split:
                    continue
                items = self._expressions_of(ref, i, images, anns, categories)
            except DataError as e:
                self.problems.append(e)
                continue
            file_name, size, exprs = items
            if exprs:
                self.image_sizes[file_name] = size
                per_image.setdefault(file_name, []).extend(exprs)
        if shared_text == "union":
            per_image = {k: self._merge_shared(v) for k, v in per_image.items()}
        self._expressions = per_image
        self._segmentations = {a: anns[a] for exprs in per_image.values() for _, _, ids, _ in exprs for a in ids}
        self.names = sorted(per_image)
        self._parsed: Dict[str, List[Annotation]] = {}
        if not self.names and not self.problems:
            raise DataError(self.refs_file, f"split {split!r} has no expression", "field")

    # -------------------------------------------------------------------------------------------- parsing
    def _read_refs(self, cache_dir: Optional[str]) -> list:
        if not self.pm.exists(self.refs_file):
            raise DataError(self.refs_file, "refs file not found (is this a REFER-style dataset? see "
                                            "--dataset-name / --split-by)", "missing_file")
        refs = load_plain_pickle_cached(self.refs_file, cache_dir=cache_dir, path_manager=self.pm)
        if not isinstance(refs, list):
            raise DataError(self.refs_file, f"expected a list of refs, got a {type(refs).__name__}", "field")
        return refs

    def _read_instances(self):
        raw = self.read_bytes(self.instances_file, "instances")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(self.instances_file, f"malformed JSON ({e})", "json") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise DataError(self.instances_file, f"no '{key}' list", "field")
        try:
            images = {int(im["id"]): im for im in data["images"]}
            anns = {int(a["id"]): a for a in data["annotations"]}
            categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(self.instances_file, f"an entry lacks a valid 'id'/'name' field ({e})", "field") from None
        return images, anns, categories

    def _expressions_of(self, ref, i: int, images, anns, categories):
        where = f"refs[{i}]"
        if not isinstance(ref, dict):
            raise DataError(self.refs_file, f"{where} is a {type(ref).__name__}, expected a dict", "field")
        missing = [k for k in _REF_KEYS if k not in ref]
        if missing:
            raise DataError(self.refs_file, f"{where} has no {missing} field(s)", "field")
        if not isinstance(ref["split"], str):
            raise DataError(self.refs_file, f"{where}.split must be a string, got {ref['split']!r}", "field")
        image = images.get(ref["image_id"])
        if image is None:
            raise DataError(self.refs_file, f"{where}.image_id {ref['image_id']} has no image in "
                                            f"{self.instances_file}", "field")
        if ref["ann_id"] not in anns:
            raise DataError(self.refs_file, f"{where}.ann_id {ref['ann_id']} has no annotation in "
                                            f"{self.instances_file}", "field")
        category = categories.get(ref["category_id"])
        if category is None:
            raise DataError(self.refs_file, f"{where}.category_id {ref['category_id']} is not a category of "
                                            f"{self.instances_file}", "field")
        file_name = str(ref.get("file_name") or image.get("file_name"))
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise DataError(self.refs_file, f"{where}.sentences must be a non-empty list", "field")
        try:
            size = (int(image["height"]), int(image["width"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(self.instances_file, f"image {ref['image_id']} lacks a valid 'height'/'width'",
                            "field") from None
        exprs = []
        for k, sent in enumerate(sentences):
            text = (sent.get("raw") or sent.get("sent")) if isinstance(sent, dict) else None
            if not isinstance(text, str) or not text.strip():  # only this sentence is lost
                self.problems.append(DataError(self.refs_file, f"{where}.sentences[{k}] has no 'raw'/'sent' text",
                                               "description"))
                continue
            sid = sent.get("sent_id", k)
            exprs.append((text.strip(), category, [int(ref["ann_id"])], f"ref {ref.get('ref_id', i)} sent {sid}"))
        return file_name, size, exprs

    @staticmethod
    def _merge_shared(exprs):
        merged: Dict[str, list] = {}
        for text, category, ids, source in exprs:
            key = " ".join(text.lower().split())
            if key in merged:
                merged[key][2] = sorted(set(merged[key][2]) | set(ids))
                merged[key][3] += f"; {source}"
            else:
                merged[key] = [text, category, list(ids), source]
        return [tuple(v) for v in merged.values()]

    # -------------------------------------------------------------------------------------------- interface
    @classmethod
    def available_splits(cls, root: str, **options) -> List[str]:
        return cls(root, None, **options).splits

    def image_path(self, name: str) -> str:
        return self.join("images", self.dataset_name, "JPEGImages", name)

    def annotation_path(self, name: str) -> str:
        return self.instances_file

    def load_annotations(self, name: str, on_bad_record: Callable[[DataError], None] = raise_error,
                         keep_empty: bool = False, on_zero_area: Optional[Callable[[], None]] = None
                         ) -> List[Annotation]:
        return drop_zero_area(self._annotations(name, on_bad_record), keep_empty, on_zero_area)

    def _annotations(self, name: str, on_bad_record: Callable[[DataError], None]) -> List[Annotation]:
        """Every expression of ``name`` with its RLEs and area, memoised per process (each loader worker fills
        its own) once the image's records all parsed."""
        cached = self._parsed.get(name)
        if cached is not None:
            return cached
        h, w = self.image_sizes[name]
        out, complete = [], True
        for index, (text, category, ids, source) in enumerate(self._expressions[name]):
            try:
                rles, area = [], 0.0
                for a in ids:
                    try:
                        found, found_area = _rles(self._segmentations[a].get("segmentation"), h, w)
                    except Exception as e:  # pycocotools raises bare Exceptions
                        raise DataError(self.instances_file, f"annotation {a}.segmentation: {e}", "field") from None
                    rles += found
                    area += found_area
            except DataError as e:
                complete = False
                on_bad_record(e)
                continue
            out.append(Annotation(index, text, category, area, {"rles": rles, "image": name}, source_id=source))
        if complete:  # a bad record must reach on_bad_record every time the image is read
            self._parsed[name] = out
        return out

    def mask_size(self, name: str, ann: Annotation) -> Optional[Tuple[int, int]]:
        return tuple(ann.segmentation["rles"][0]["size"])

    def decode_stored_masks(self, name: str, annotations: Sequence[Annotation]) -> List[np.ndarray]:
        masks = []
        for ann in annotations:
            rles = ann.segmentation["rles"]
            h, w = rles[0]["size"]
            try:
                masks.append(decode_rles(rles, h, w).any(0))
            except RLEError as e:
                raise DataError(self.instances_file, f"{name} expression {ann.index}: {e.problem}", "field") from None
        return masks
