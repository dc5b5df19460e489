"""Writers of the synthetic scenes in the public referring-segmentation release formats.

:func:`rsam.data.synthetic.generate` draws every scene once and hands the stream of :class:`DrawnImage` to one
writer of :data:`FORMATS`; each writer lays the files out as the corresponding release does (see the package
docstring for the layouts), so that every dataset reader can be tested offline.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

from rsam.data.rle import encode_rle
from rsam.data.synthetic.language import negative_category
from rsam.data.synthetic.scene import CATEGORIES, SceneObject

__all__ = ["DrawnImage", "FormatOptions", "FORMATS", "check_options", "mask_polygons", "DEFECT_CROPS"]

SPLITS = ("train", "val", "test")
# (columns cut off at the right, rows cut off at the bottom) of the first images' JPEGs with ``defects``: the
# RRSIS-D release has JPEGs of 787-802 px whose masks are 800x800. Cutting the right/bottom edge keeps the
# top-left pixels aligned with the full-size masks.
DEFECT_CROPS = ((3, 5), (0, 2))


@dataclass
class DrawnImage:
    """One drawn scene, ready to be written: ``records`` are (text, target object index or None, kind)."""

    index: int
    name: str
    split: str
    image: np.ndarray  # (H, W, 3) uint8
    masks: List[np.ndarray]  # one (H, W) bool mask per object
    objects: List[SceneObject]
    records: List[Tuple[str, Optional[int], str]]


@dataclass
class FormatOptions:
    """Options of the writers; all but ``jpeg_quality`` apply to one format only (see :func:`check_options`)."""

    jpeg_quality: int = 92
    refer_name: str = "rrsisd"  # rrsisd: <name>/refs(<split_by>).p, <name>/instances.json, images/<name>/JPEGImages
    refer_split_by: str = "unc"
    refer_prefix: str = ""  # rrsisd: prepended to both file names ("new_" for NWPU-Refer)
    polygons: bool = False  # rrsisd: outline polygons instead of RLEs
    shared_text_refs: int = 0  # rrsisd: images with two same-category refs that share one sentence
    defects: bool = False  # rrsisd: the first JPEGs are smaller than instances.json says
    mask_channels: int = 1  # refsegrs: 1 or 3 channel mask TIFFs


_OPTION_FORMAT = {f.name: "rrsisd" for f in fields(FormatOptions)}
_OPTION_FORMAT.update(jpeg_quality="", mask_channels="refsegrs")


def check_options(fmt: str, options: FormatOptions) -> None:
    """Raise ValueError for an unknown format, an invalid value, or an option set for another format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    if options.mask_channels not in (1, 3):
        raise ValueError(f"mask_channels must be 1 or 3, got {options.mask_channels}")
    if options.shared_text_refs < 0:
        raise ValueError(f"shared_text_refs must be >= 0, got {options.shared_text_refs}")
    defaults = FormatOptions()
    for name, owner in _OPTION_FORMAT.items():
        # Silently ignoring e.g. --polygons for refsegrs would hand a reader test data it did not ask for.
        if owner and owner != fmt and getattr(options, name) != getattr(defaults, name):
            raise ValueError(f"option {name}={getattr(options, name)!r} applies to format {owner!r}, not {fmt!r}")


def _write_split_lists(out_dir: str, pattern: str, lines: Dict[str, List[str]]) -> None:
    for split in SPLITS:
        with open(os.path.join(out_dir, pattern.format(split=split)), "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in lines[split]))


# ------------------------------------------------------------------------------------------------ risors


def write_risors(out_dir: str, drawn: Iterable[DrawnImage], options: FormatOptions) -> None:
    """``JPEGImages/<name>.jpg``, ``Annotations/<name>.json``, ``RISORS_{train,val,test}.txt``."""
    for sub in ("JPEGImages", "Annotations"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    names: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for d in drawn:
        jpeg = os.path.join(out_dir, "JPEGImages", f"{d.name}.jpg")
        Image.fromarray(d.image).save(jpeg, quality=options.jpeg_quality)
        empty_rle = encode_rle(np.zeros(d.image.shape[:2], dtype=bool))
        annotations = []
        for text, target, _ in d.records:
            if target is None:
                seg, area, cat = empty_rle, 0.0, negative_category(text)
            else:
                seg, area, cat = encode_rle(d.masks[target]), float(d.objects[target].area), d.objects[target].category
            annotations.append({"segmentation": seg, "area": area, "description": text, "name": cat})
        with open(os.path.join(out_dir, "Annotations", f"{d.name}.json"), "w", encoding="utf-8") as f:
            json.dump({"annotations": annotations}, f)
        names[d.split].append(d.name)
    _write_split_lists(out_dir, "RISORS_{split}.txt", names)


# ------------------------------------------------------------------------------------------------ rrsisd (REFER)


def mask_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer outlines of a bool mask as COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` on pixel corners.

    Every foreground/background pixel edge becomes a directed edge (foreground on the right, i.e. outer outlines
    run clockwise on screen); the edges are chained into closed loops, turning right where two pixels touch only
    at a corner, so each loop is a simple polygon. Loops of positive area are the outer outlines (one per
    4-connected component) and are returned without collinear vertices; holes (negative loops) are dropped, as
    COCO polygons cannot carry them. pycocotools rasterises these polygons back to the mask exactly.
    """
    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), dtype=bool)
    pad[1:-1, 1:-1] = mask
    fg = pad[1:-1, 1:-1]
    out_edges: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    # (exposed side, edge start and end as (dx, dy) from the pixel's top-left corner)
    sides = ((~pad[:-2, 1:-1], (0, 0), (1, 0)), (~pad[1:-1, 2:], (1, 0), (1, 1)),
             (~pad[2:, 1:-1], (1, 1), (0, 1)), (~pad[1:-1, :-2], (0, 1), (0, 0)))
    edges: List[Tuple[Tuple[int, int], Tuple[int, int]]] = []
    for exposed, (ax, ay), (bx, by) in sides:
        rows, cols = np.nonzero(fg & exposed)
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = (c + ax, r + ay), (c + bx, r + by)
            out_edges.setdefault(a, []).append(b)
            edges.append((a, b))
    visited = set()
    polygons = []
    for first in edges:
        if first in visited:
            continue
        loop, edge = [], first
        while edge not in visited:
            visited.add(edge)
            (ax, ay), b = edge
            loop.append(b)
            nexts = out_edges[b]
            if len(nexts) == 1:
                edge = (b, nexts[0])
            else:  # a corner shared by two diagonal pixels: turn right (screen coordinates, y down)
                dx, dy = b[0] - ax, b[1] - ay
                edge = (b, (b[0] - dy, b[1] + dx))
        corners = [p for i, p in enumerate(loop) if _turns(loop[i - 1], p, loop[(i + 1) % len(loop)])]
        area2 = sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(corners, corners[1:] + corners[:1]))
        if area2 > 0:
            polygons.append([float(v) for p in corners for v in p])
    return polygons


def _turns(a: Tuple[int, int], b: Tuple[int, int], c: Tuple[int, int]) -> bool:
    return (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0


def _bbox(mask: np.ndarray) -> List[float]:
    rows, cols = np.nonzero(mask)
    x0, y0 = int(cols.min()), int(rows.min())
    return [float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)]


def _shared_pair(objects: List[SceneObject]) -> Optional[Tuple[int, int, str]]:
    """Two objects of one category and a sentence naming both, preferring a category present exactly twice."""
    by_cat: Dict[str, List[int]] = {}
    for i, o in enumerate(objects):
        by_cat.setdefault(o.category, []).append(i)
    pairs = [(len(ids) != 2, CATEGORIES.index(c), ids) for c, ids in by_cat.items() if len(ids) >= 2]
    if not pairs:
        return None
    more_than_two, _, ids = min(pairs)
    plural = f"{objects[ids[0]].category}s"
    return ids[0], ids[1], f"two of the {plural}" if more_than_two else f"the two {plural}"


def write_rrsisd(out_dir: str, drawn: Iterable[DrawnImage], options: FormatOptions) -> None:
    """REFER-style release: ``<name>/<prefix>refs(<split_by>).p``, ``<name>/<prefix>instances.json`` and
    ``images/<name>/JPEGImages/<file_name>``. A no-target record is a ref to an annotation with an empty RLE
    (area 0): what the reader keeps as a no-target expression with ``empty_annotations: negative``."""
    name, prefix = options.refer_name, options.refer_prefix
    image_dir = os.path.join(out_dir, "images", name, "JPEGImages")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    images: List[dict] = []
    annotations: List[dict] = []
    refs: List[dict] = []
    ids = {"ann": 0, "ref": 0, "sent": 0}
    shared_left = options.shared_text_refs

    def next_id(kind: str) -> int:
        ids[kind] += 1
        return ids[kind] - 1

    def add_ref(d: DrawnImage, ann_id: int, category_id: int, file_name: str, texts: List[str]) -> None:
        sentences = []
        for text in texts:
            sent = text.lower()
            # Capitalised raw text, as annotators typed it; readers should use the lower-case "sent".
            sentences.append({"raw": text[:1].upper() + text[1:], "sent": sent, "tokens": sent.split(),
                              "sent_id": next_id("sent")})
        refs.append({"ref_id": next_id("ref"), "ann_id": ann_id, "image_id": d.index, "category_id": category_id,
                     "split": d.split, "file_name": file_name, "sent_ids": [s["sent_id"] for s in sentences],
                     "sentences": sentences})

    for d in drawn:
        h, w = d.image.shape[:2]
        file_name = f"{d.name}.jpg"
        picture = Image.fromarray(d.image)
        if options.defects and d.index < len(DEFECT_CROPS):
            cut_x, cut_y = DEFECT_CROPS[d.index]
            picture = picture.crop((0, 0, w - cut_x, h - cut_y))
        picture.save(os.path.join(image_dir, file_name), quality=options.jpeg_quality)
        images.append({"id": d.index, "file_name": file_name, "height": h, "width": w})
        ann_ids = []
        for mask, obj in zip(d.masks, d.objects):
            bbox = _bbox(mask)
            box_area = bbox[2] * bbox[3]
            ann_ids.append(next_id("ann"))
            annotations.append({
                "id": ann_ids[-1], "image_id": d.index,
                "segmentation": mask_polygons(mask) if options.polygons else [encode_rle(mask)],
                "bbox": bbox,
                # Deliberately not the pixel count (the release's areas are unreliable): the bbox area, moved off
                # the true value for a mask that fills its box, so a reader that trusts "area" shows up in tests.
                "area": box_area + 1.0 if box_area == int(mask.sum()) else box_area,
                "categories_id": CATEGORIES.index(obj.category),
            })
        texts_of: Dict[int, List[str]] = {}
        for text, target, _ in d.records:
            if target is not None:
                texts_of.setdefault(target, []).append(text)
        for target in sorted(texts_of):
            add_ref(d, ann_ids[target], CATEGORIES.index(d.objects[target].category), file_name, texts_of[target])
        for text in (text for text, target, _ in d.records if target is None):
            category = CATEGORIES.index(negative_category(text))
            annotations.append({"id": next_id("ann"), "image_id": d.index, "bbox": [0, 0, 0, 0], "area": 0.0,
                                "segmentation": [encode_rle(np.zeros((h, w), dtype=bool))],
                                "categories_id": category})
            add_ref(d, annotations[-1]["id"], category, file_name, [text])
        pair = _shared_pair(d.objects) if shared_left > 0 else None
        if pair is not None:
            # A multi-object expression (NWPU-Refer style): one ref per object, the same text, distinct sent_ids.
            first, second, text = pair
            for target in (first, second):
                add_ref(d, ann_ids[target], CATEGORIES.index(d.objects[target].category), file_name, [text])
            shared_left -= 1
    if shared_left > 0:
        warnings.warn(f"only {options.shared_text_refs - shared_left} of {options.shared_text_refs} shared-text "
                      "refs written: too few images have two objects of one category")
    with open(os.path.join(out_dir, name, f"{prefix}refs({options.refer_split_by}).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    categories = [{"id": i, "name": c} for i, c in enumerate(CATEGORIES)]
    with open(os.path.join(out_dir, name, f"{prefix}instances.json"), "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


# ------------------------------------------------------------------------------------------------ refsegrs, risbench


def _write_expression_pairs(out_dir: str, drawn: Iterable[DrawnImage], image_dir: str, mask_dir: str, ext: str,
                            key_has_ext: bool, mask_channels: int) -> None:
    """One image copy and one 0/255 mask per expression, named by a running id; ``output_phrase_<split>.txt``
    lines are ``<id or file name> <expression>``. A no-target record gets an all-zero mask: the reader keeps it,
    and training learns "no target" from its empty ground truth (rsam/losses.py: object target = mask.any())."""
    for sub in (image_dir, mask_dir):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    lines: Dict[str, List[str]] = {s: [] for s in SPLITS}
    count = 0
    for d in drawn:
        picture = Image.fromarray(d.image)
        for text, target, _ in d.records:
            stem = f"{count:05d}"
            count += 1
            target_mask = d.masks[target] if target is not None else np.zeros(d.image.shape[:2], dtype=bool)
            mask = target_mask.astype(np.uint8) * 255
            if mask_channels == 3:
                mask = np.repeat(mask[..., None], 3, axis=2)
            picture.save(os.path.join(out_dir, image_dir, stem + ext))
            Image.fromarray(mask).save(os.path.join(out_dir, mask_dir, stem + ext))
            lines[d.split].append(f"{stem + ext if key_has_ext else stem} {text}")
    _write_split_lists(out_dir, "output_phrase_{split}.txt", lines)


def write_refsegrs(out_dir: str, drawn: Iterable[DrawnImage], options: FormatOptions) -> None:
    """``images/<id>.tif`` (RGB), ``masks/<id>.tif`` (0/255), ``output_phrase_{split}.txt``: ``<id> <text>``."""
    _write_expression_pairs(out_dir, drawn, "images", "masks", ".tif", False, options.mask_channels)


def write_risbench(out_dir: str, drawn: Iterable[DrawnImage], options: FormatOptions) -> None:
    """``img_rgb/<id>.png``, ``mask/<id>.png`` (0/255), ``output_phrase_{split}.txt``: ``<id>.png <text>``."""
    _write_expression_pairs(out_dir, drawn, "img_rgb", "mask", ".png", True, 1)


# ------------------------------------------------------------------------------------------------ jsonl


def write_jsonl(out_dir: str, drawn: Iterable[DrawnImage], options: FormatOptions) -> None:
    """``images/<name>.jpg`` and ``manifest.jsonl``: one object per expression, no-target ones with mask null."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as manifest:
        for d in drawn:
            h, w = d.image.shape[:2]
            image = f"images/{d.name}.jpg"
            Image.fromarray(d.image).save(os.path.join(out_dir, image), quality=options.jpeg_quality)
            for k, (text, target, _) in enumerate(d.records):
                line = {
                    "image": image, "height": h, "width": w, "split": d.split, "text": text,
                    "mask": None if target is None else encode_rle(d.masks[target]),
                    # No object, no category: the absent category lives only in the text.
                    "category": None if target is None else d.objects[target].category,
                    "source": {"dataset": "synthetic", "id": f"{d.name}:{k}"},
                }
                manifest.write(json.dumps(line) + "\n")


Writer = Callable[[str, Iterable[DrawnImage], FormatOptions], None]
FORMATS: Dict[str, Writer] = {
    "risors": write_risors,
    "rrsisd": write_rrsisd,
    "refsegrs": write_refsegrs,
    "risbench": write_risbench,
    "jsonl": write_jsonl,
}
