"""Synthetic RISORS-format dataset: procedurally drawn aerial-like scenes with referring expressions.

    python -m rsam.data.synthetic --out data/demo --num-images 600 --size 256 --seed 0 [--neg-ratio 0.5]

writes ``JPEGImages/<name>.jpg``, ``Annotations/<name>.json`` (COCO RLE ``segmentation``, ``area``,
``description``, ``name``) and ``RISORS_{train,val,test}.txt`` -- exactly what :mod:`rsam.data.risors` reads --
plus ``vocab.txt``, a small WordPiece vocabulary of the grammar for a tiny text encoder.

Scenes: textured ground with field patches and roads; 3-6 non-overlapping objects (storage tanks, airplanes,
vehicles, buildings, ships) in five colours, with random sizes (a fraction of the image side), orientations and
cast shadows. Categories repeat within an image on purpose, so the expression -- not the picture alone -- decides
which object is meant. Expressions come from a few templates over a small vocabulary:

    category      "the ship"                      colour        "the red ship"
    region        "the ship at the top left"      superlative   "the largest white building"
    ordinal       "the second vehicle from the left"
    relation      "the airplane left of the white storage tank"

Every expression is checked to single out its object among *all* objects of the image, with safety margins on
positions and sizes so that no expression is borderline; :func:`resolve` parses an expression back and evaluates
it on the scene (used by the tests). With ``neg_ratio > 0`` each image also gets ``k ~ Poisson(neg_ratio)``
no-target records (an absent category or colour/category pair) with an empty mask and ``area`` 0; the official
reader skips them, ``RISORSDataset(empty_annotations="negative")`` uses them as in-image no-target expressions.

Everything is drawn with vectorised numpy on the object's own patch; one generator per (seed, image index) makes
the output deterministic and independent of ``num_images`` for the images they share.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = ("storage tank", "airplane", "vehicle", "building", "ship")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "white": (236, 236, 230),
    "red": (206, 42, 38),
    "blue": (38, 78, 212),
    "yellow": (238, 204, 36),
    "green": (36, 156, 58),
}
# (row, col) of a 3x3 grid -> phrase.
REGIONS = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
ORDINALS = ("first", "second", "third")
DIRECTIONS = ("left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
GROUND_PALETTES = ((152, 142, 116), (128, 127, 116), (142, 128, 100), (118, 120, 104), (160, 150, 132))

# Relative frequency of each expression kind among those valid for an object: the simple kinds dominate so that a
# small model learns quickly, the compositional ones keep the language necessary.
KIND_WEIGHTS = {"category": 1.0, "colour": 1.0, "region": 1.0, "ordinal": 0.6, "superlative": 0.6, "relation": 0.5}
POS_MARGIN = 0.05  # fraction of the side: no position statement is made closer than this to its boundary
SIZE_RATIO = 1.4  # superlatives need this area ratio to the runner-up


@dataclass
class SceneObject:
    category: str
    colour: str
    cx: float  # mask centroid, fraction of the width
    cy: float  # mask centroid, fraction of the height
    area: int  # pixels
    angle: float
    extent: float  # longest side, pixels


@dataclass
class SceneRecord:
    """One written image: its objects and its annotation records (``target`` = object index, None = negative)."""

    name: str
    split: str
    objects: List[SceneObject]
    descriptions: List[str] = field(default_factory=list)
    targets: List[Optional[int]] = field(default_factory=list)
    kinds: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1], (size, size): a (cells+1)^2 random grid upsampled bicubically."""
    small = rng.integers(0, 256, size=(cells + 1, cells + 1), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return big / 127.5 - 1.0


def _draw_ground(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.asarray(GROUND_PALETTES[rng.integers(len(GROUND_PALETTES))], np.float32) + rng.normal(0, 5, 3)
    tone = 16 * _smooth_noise(rng, size, 4) + 7 * _smooth_noise(rng, size, max(size // 16, 4))
    # Field patches: a thresholded low-frequency noise gets a muted tint.
    fields = (_smooth_noise(rng, size, 3) > 0.35).astype(np.float32)
    tint = np.asarray([-14, -6, -18], np.float32) * np.float32(rng.uniform(0.5, 1.2))
    tone += 3.5 * rng.standard_normal((size, size), dtype=np.float32)  # grain
    img = base.astype(np.float32) + tone[..., None] + fields[..., None] * tint
    xs = np.arange(size, dtype=np.float32)[None, :]
    ys = np.arange(size, dtype=np.float32)[:, None]
    for _ in range(int(rng.integers(0, 3))):
        px, py = (float(v) for v in rng.uniform(0, size, 2))  # Python floats keep the grids float32
        phi = float(rng.uniform(0, math.pi))
        width = size * float(rng.uniform(0.03, 0.05))
        across = np.abs(-(xs - px) * math.sin(phi) + (ys - py) * math.cos(phi))
        along = (xs - px) * math.cos(phi) + (ys - py) * math.sin(phi)
        img[across <= width / 2] = rng.uniform(72, 92)
        dash = (across <= max(width * 0.07, 0.6)) & (np.mod(along, size * 0.06) < size * 0.03)
        img[dash] = (205, 205, 195)
    return img


def _shape(category: str, u: np.ndarray, v: np.ndarray, length: float, aspect: float) -> Tuple[np.ndarray, np.ndarray]:
    """Object footprint and a shading factor on object-aligned coordinates (u along the axis, v across)."""
    half = length / 2
    shade = np.ones_like(u)
    if category == "storage tank":
        r = np.hypot(u, v)
        mask = r <= half
        shade = np.where((r > 0.55 * half) & (r < 0.68 * half), np.float32(0.78), shade)
        shade[r < 0.12 * half] = 0.8
    elif category == "airplane":
        fuselage = (u / half) ** 2 + (v / (0.15 * half)) ** 2 <= 1
        wings = (np.abs(u - 0.1 * half + 0.45 * np.abs(v)) <= 0.2 * half) & (np.abs(v) <= 0.95 * half)
        tail = (np.abs(u + 0.8 * half + 0.3 * np.abs(v)) <= 0.12 * half) & (np.abs(v) <= 0.4 * half)
        mask = fuselage | wings | tail
        shade[wings & ~fuselage] = 0.9
    elif category == "vehicle":
        mask = (u / half) ** 4 + (v / (aspect * half)) ** 4 <= 1
        shade[(u > 0.25 * half) & (u < 0.55 * half)] = 0.45
    elif category == "building":
        mask = (np.abs(u) <= half) & (np.abs(v) <= aspect * half)
        shade[v > 0] = 0.84
        shade[np.abs(v) <= 0.05 * half] = 1.08
    elif category == "ship":
        width = 0.34 * half * np.clip((half - u) / (0.45 * half), 0, 1)  # pointed bow at u = +half
        mask = (np.abs(u) <= half) & (np.abs(v) <= width)
        shade[(u > -0.75 * half) & (u < -0.25 * half) & (np.abs(v) <= 0.18 * half)] = 0.75
    else:
        raise ValueError(f"unknown category {category!r}")
    return mask, shade


_ASPECT = {"storage tank": (1.0, 1.0), "airplane": (1.0, 1.0), "vehicle": (0.45, 0.55), "building": (0.55, 1.0), "ship": (1.0, 1.0)}


def _bounding_radius(category: str, length: float, aspect: float) -> float:
    half = length / 2
    return half * math.sqrt(1 + aspect**2) if category in ("building", "vehicle") else half


def _render(rng: np.random.Generator, size: int, specs: List[dict]) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Draw ground, shadows and objects -> uint8 image (S,S,3), one bool mask (S,S) per object."""
    img = _draw_ground(rng, size)
    patches = []  # (footprint, shade, (y0, y1, x0, x1)) on each object's own bounding box
    for s in specs:
        rad = s["radius"]
        x0, y0 = int(max(math.floor(s["x"] - rad) - 1, 0)), int(max(math.floor(s["y"] - rad) - 1, 0))
        x1, y1 = int(min(math.ceil(s["x"] + rad) + 2, size)), int(min(math.ceil(s["y"] + rad) + 2, size))
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + (0.5 - s["x"])
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + (0.5 - s["y"])
        c, si = math.cos(s["angle"]), math.sin(s["angle"])
        local, shade = _shape(s["category"], dx * c + dy * si, -dx * si + dy * c, s["length"], s["aspect"])
        patches.append((local, shade, (y0, y1, x0, x1)))
    masks = []
    for local, _, (y0, y1, x0, x1) in patches:
        full = np.zeros((size, size), dtype=bool)
        full[y0:y1, x0:x1] = local
        masks.append(full)
    union = np.logical_or.reduce(masks) if masks else np.zeros((size, size), bool)
    # Shadows: every footprint shifted down-right, darkening the ground only.
    for (local, _, (y0, y1, x0, x1)), s in zip(patches, specs):
        d = max(1, int(round(0.07 * s["length"])))
        ys, xs = y0 + d, x0 + d
        h, w = min(y1 + d, size) - ys, min(x1 + d, size) - xs
        if h <= 0 or w <= 0:
            continue
        shadow = local[:h, :w] & ~union[ys : ys + h, xs : xs + w]
        img[ys : ys + h, xs : xs + w][shadow] *= 0.58
    for (local, shade, (y0, y1, x0, x1)), s in zip(patches, specs):
        colour = np.asarray(COLOURS[s["colour"]], np.float32) * s["brightness"]
        patch = img[y0:y1, x0:x1]
        patch[local] = colour * shade[local][:, None] + rng.normal(0, 3, (int(local.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), masks


def _layout(rng: np.random.Generator, size: int, n: int, min_frac: float, max_frac: float) -> List[dict]:
    """Categories, colours, sizes and non-overlapping positions of up to ``n`` objects."""
    n_cat = int(rng.integers(2, min(n, len(CATEGORIES)) + 1))
    cats = list(rng.choice(len(CATEGORIES), size=n_cat, replace=False))
    cats += list(rng.choice(cats, size=n - n_cat))
    rng.shuffle(cats)
    specs = []
    for ci in cats:
        cat = CATEGORIES[int(ci)]
        length = size * float(rng.uniform(min_frac, max_frac))
        aspect = float(rng.uniform(*_ASPECT[cat]))
        specs.append(
            {
                "category": cat,
                "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                "length": length,
                "aspect": aspect,
                "radius": _bounding_radius(cat, length, aspect),
                "angle": float(rng.uniform(0, 2 * math.pi)),
                "brightness": float(rng.uniform(0.9, 1.04)),
            }
        )
    specs.sort(key=lambda s: -s["radius"])  # place the big ones first
    gap = 0.03 * size
    placed: List[dict] = []
    for s in specs:
        lo, hi = s["radius"] + 2, size - s["radius"] - 2
        if hi <= lo:
            continue
        for _ in range(100):
            x, y = rng.uniform(lo, hi, 2)
            if all(math.hypot(x - p["x"], y - p["y"]) > s["radius"] + p["radius"] + gap for p in placed):
                placed.append({**s, "x": float(x), "y": float(y)})
                break
    return placed


# --------------------------------------------------------------------------------------------------- language


def _cell(value: float) -> Optional[int]:
    """Third of [0,1] that ``value`` is in, or None when it is within POS_MARGIN of a boundary."""
    for b in (1 / 3, 2 / 3):
        if abs(value - b) < POS_MARGIN:
            return None
    return int(value >= 1 / 3) + int(value >= 2 / 3)


def _coord(o: SceneObject, direction: str) -> float:
    """Sort key for 'from the <direction>' (smaller = closer to that side)."""
    return {"left": o.cx, "right": -o.cx, "top": o.cy, "bottom": -o.cy}[direction]


def _relation_value(o: SceneObject, landmark: SceneObject, relation: str) -> float:
    """Signed distance (fraction of the side) by which ``o`` satisfies ``relation`` to ``landmark``."""
    return {
        "left of": landmark.cx - o.cx,
        "right of": o.cx - landmark.cx,
        "above": landmark.cy - o.cy,
        "below": o.cy - landmark.cy,
    }[relation]


def _heads(t: int, objs: Sequence[SceneObject]) -> List[Tuple[str, str, List[int]]]:
    """(kind, noun phrase, indices it matches) for the target's two noun phrases."""
    o = objs[t]
    same_cat = [i for i, p in enumerate(objs) if p.category == o.category]
    same_cc = [i for i in same_cat if objs[i].colour == o.colour]
    return [("category", o.category, same_cat), ("colour", f"{o.colour} {o.category}", same_cc)]


def _landmark_phrase(i: int, objs: Sequence[SceneObject]) -> Optional[str]:
    for _, phrase, matches in _heads(i, objs):
        if matches == [i]:
            return phrase
    return None


def candidate_expressions(t: int, objs: Sequence[SceneObject]) -> Dict[str, List[str]]:
    """Every template expression that singles out object ``t`` (with margins), grouped by kind."""
    out: Dict[str, List[str]] = {}

    def add(kind: str, text: str) -> None:
        out.setdefault(kind, []).append(text)

    for kind, head, cands in _heads(t, objs):
        others = [i for i in cands if i != t]
        if not others:
            add(kind, f"the {head}")
        # absolute region
        cells = {i: (_cell(objs[i].cy), _cell(objs[i].cx)) for i in cands}
        if all(None not in c for c in cells.values()) and all(cells[i] != cells[t] for i in others):
            add("region", f"the {head} {REGIONS[cells[t]]}")
        if others:
            # superlative
            area_t, areas = objs[t].area, [objs[i].area for i in others]
            if area_t >= SIZE_RATIO * max(areas):
                add("superlative", f"the largest {head}")
            if area_t * SIZE_RATIO <= min(areas):
                add("superlative", f"the smallest {head}")
            # ordinal
            for direction in DIRECTIONS:
                order = sorted(cands, key=lambda i: _coord(objs[i], direction))
                keys = [_coord(objs[i], direction) for i in order]
                if min(b - a for a, b in zip(keys, keys[1:])) < 2 * POS_MARGIN:
                    continue
                rank = order.index(t)
                if rank < len(ORDINALS):
                    add("ordinal", f"the {ORDINALS[rank]} {head} from the {direction}")
        # relation to a landmark of another category that has its own unique phrase
        for li, landmark in enumerate(objs):
            if landmark.category == objs[t].category:
                continue
            lphrase = _landmark_phrase(li, objs)
            if lphrase is None:
                continue
            for rel in RELATIONS:
                if _relation_value(objs[t], landmark, rel) >= POS_MARGIN and all(
                    _relation_value(objs[i], landmark, rel) <= -POS_MARGIN for i in others
                ):
                    add("relation", f"the {head} {rel} the {lphrase}")
    return out


def negative_candidates(objs: Sequence[SceneObject]) -> List[Tuple[str, str]]:
    """(description, category) of objects absent from the scene: absent category or colour/category pair."""
    cats = {o.category for o in objs}
    pairs = {(o.colour, o.category) for o in objs}
    out = [(f"the {c}", c) for c in CATEGORIES if c not in cats]
    out += [(f"the {col} {c}", c) for c in CATEGORIES for col in COLOURS if (col, c) not in pairs]
    return out


def _alternation(words) -> str:
    """Regex alternation, longest first (so "at the top left" wins over "at the top")."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_NP = rf"(?:(?P<{{p}}col>{_alternation(COLOURS)}) )?(?P<{{p}}cat>{_alternation(CATEGORIES)})"
_GRAMMAR = re.compile(
    rf"^the (?:(?P<sup>largest|smallest) |(?P<ord>{_alternation(ORDINALS)}) )?"
    + _NP.format(p="")
    + rf"(?: from the (?P<dir>{_alternation(DIRECTIONS)}))?"
    + rf"(?: (?P<region>{_alternation(REGIONS.values())}))?"
    + rf"(?: (?P<rel>{_alternation(RELATIONS)}) the "
    + _NP.format(p="l")
    + r")?$"
)


def resolve(description: str, objs: Sequence[SceneObject]) -> List[int]:
    """Objects an expression of this module's grammar refers to, evaluated without margins.

    Independent of how :func:`candidate_expressions` built the text, so the two can check each other.
    """
    m = _GRAMMAR.match(description)
    if m is None:
        raise ValueError(f"not an expression of the synthetic grammar: {description!r}")
    g = m.groupdict()

    def match_np(col: Optional[str], cat: str) -> List[int]:
        return [i for i, o in enumerate(objs) if o.category == cat and (col is None or o.colour == col)]

    cands = match_np(g["col"], g["cat"])
    if g["region"]:
        (cell,) = [k for k, v in REGIONS.items() if v == g["region"]]
        cands = [i for i in cands if (min(int(objs[i].cy * 3), 2), min(int(objs[i].cx * 3), 2)) == cell]
    if g["rel"]:
        landmarks = match_np(g["lcol"], g["lcat"])
        if len(landmarks) != 1:
            return []
        cands = [i for i in cands if _relation_value(objs[i], objs[landmarks[0]], g["rel"]) > 0]
    if g["sup"] and cands:
        key = (lambda i: -objs[i].area) if g["sup"] == "largest" else (lambda i: objs[i].area)
        cands = sorted(cands, key=key)[:1]
    if g["ord"]:
        rank = ORDINALS.index(g["ord"])
        order = sorted(cands, key=lambda i: _coord(objs[i], g["dir"]))
        cands = order[rank : rank + 1]
    return cands


# --------------------------------------------------------------------------------------------------- writing


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _split_of(i: int, n: int, val_fraction: float, test_fraction: float) -> str:
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test, n_val = max(n_test, 1 if test_fraction > 0 else 0), max(n_val, 1 if val_fraction > 0 else 0)
    n_train = n - n_val - n_test
    return "train" if i < n_train else ("val" if i < n_train + n_val else "test")


def make_scene(
    rng: np.random.Generator,
    size: int,
    min_objects: int = 3,
    max_objects: int = 6,
    min_object_frac: float = 0.15,
    max_object_frac: float = 0.3,
    expressions_per_object: int = 1,
    neg_ratio: float = 0.0,
) -> Tuple[np.ndarray, List[np.ndarray], List[SceneObject], List[Tuple[str, Optional[int], str]]]:
    """One scene -> image (S,S,3) uint8, masks, objects, [(description, target or None, kind)]."""
    for _ in range(20):
        n = int(rng.integers(min_objects, max_objects + 1))
        specs = _layout(rng, size, n, min_object_frac, max_object_frac)
        if len(specs) < min(min_objects, 2):
            continue
        image, masks = _render(rng, size, specs)
        objs = []
        centres = np.arange(size) + 0.5
        for s, m in zip(specs, masks):
            area = int(m.sum())
            cx = float(m.sum(0) @ centres) / (area * size)
            cy = float(m.sum(1) @ centres) / (area * size)
            objs.append(SceneObject(s["category"], s["colour"], cx, cy, area, float(s["angle"]), float(s["length"])))
        records: List[Tuple[str, Optional[int], str]] = []
        used = set()
        for t in range(len(objs)):
            cands = candidate_expressions(t, objs)
            for _ in range(expressions_per_object):
                kinds = [k for k, texts in cands.items() if any(x not in used for x in texts)]
                if not kinds:
                    break
                weights = np.asarray([KIND_WEIGHTS[k] for k in kinds])
                kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
                texts = [x for x in cands[kind] if x not in used]
                text = texts[int(rng.integers(len(texts)))]
                used.add(text)
                records.append((text, t, kind))
        if not records:
            continue
        negs = negative_candidates(objs)
        k = min(int(rng.poisson(neg_ratio)), len(negs)) if neg_ratio > 0 else 0
        for j in rng.choice(len(negs), size=k, replace=False) if k else []:
            records.append((negs[int(j)][0], None, "negative"))
        return image, masks, objs, records
    raise RuntimeError(f"could not lay out a scene of {min_objects}-{max_objects} objects at {size} px")


def generate(
    out_dir: str,
    num_images: int,
    size: int = 256,
    seed: int = 0,
    neg_ratio: float = 0.0,
    min_objects: int = 3,
    max_objects: int = 6,
    min_object_frac: float = 0.15,
    max_object_frac: float = 0.3,
    expressions_per_object: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    jpeg_quality: int = 92,
    prefix: str = "synthetic",
    write_vocabulary: bool = True,
) -> List[SceneRecord]:
    """Write a synthetic RISORS-format dataset to ``out_dir`` and return what was drawn (for tests/demos).

    Besides the RISORS files, ``write_vocabulary`` adds ``<out_dir>/vocab.txt``: a ~130-entry WordPiece
    vocabulary covering the grammar, for a tiny BERT trained from scratch (see :func:`write_vocab`).
    """
    if num_images < 1 or size < 32:
        raise ValueError(f"need num_images >= 1 and size >= 32, got {num_images}, {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    for sub in ("JPEGImages", "Annotations"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    scenes: List[SceneRecord] = []
    splits: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    empty_rle = _encode(np.zeros((size, size), dtype=bool))
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        image, masks, objs, records = make_scene(
            rng, size, min_objects, max_objects, min_object_frac, max_object_frac, expressions_per_object, neg_ratio
        )
        name = f"{prefix}_{i:06d}"
        split = _split_of(i, num_images, val_fraction, test_fraction)
        Image.fromarray(image).save(os.path.join(out_dir, "JPEGImages", f"{name}.jpg"), quality=jpeg_quality)
        annotations = []
        for text, target, _ in records:
            if target is None:
                seg, area, cat = empty_rle, 0.0, negative_category(text)
            else:
                seg, area, cat = _encode(masks[target]), float(objs[target].area), objs[target].category
            annotations.append({"segmentation": seg, "area": area, "description": text, "name": cat})
        with open(os.path.join(out_dir, "Annotations", f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump({"annotations": annotations}, f)
        splits[split].append(name)
        scenes.append(
            SceneRecord(name, split, objs, [r[0] for r in records], [r[1] for r in records], [r[2] for r in records])
        )
    for split, names in splits.items():
        with open(os.path.join(out_dir, f"RISORS_{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in names))
    if write_vocabulary:
        write_vocab(os.path.join(out_dir, "vocab.txt"))
    return scenes


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def grammar_words() -> List[str]:
    """Every word the expression templates can produce, sorted."""
    phrases = [*CATEGORIES, *COLOURS, *REGIONS.values(), *ORDINALS, *DIRECTIONS, *RELATIONS]
    phrases += ["the largest smallest from"]
    return sorted({w for p in phrases for w in p.split()})


def write_vocab(path: str) -> None:
    """A small BERT WordPiece vocabulary for a tiny text encoder trained from scratch on this grammar.

    Special tokens, the grammar's words, then single characters (and their ``##`` continuations) so that any
    other text still tokenises into known pieces instead of [UNK].
    """
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"()-/#&")
    tokens = list(SPECIAL_TOKENS) + grammar_words()
    tokens += [c for c in chars if c not in tokens] + [f"##{c}" for c in chars if c.isalnum()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{t}\n" for t in tokens))


def negative_category(description: str) -> str:
    """Category named by a description of this grammar (for the ``name`` field of no-target records)."""
    m = _GRAMMAR.match(description)
    if m is None:
        raise ValueError(f"not an expression of the synthetic grammar: {description!r}")
    return m.group("cat")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic RISORS-format referring segmentation dataset.")
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--num-images", type=int, default=600)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neg-ratio", type=float, default=0.0, help="mean no-target records per image (area 0)")
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--min-object-frac", type=float, default=0.15, help="smallest object extent / image side")
    p.add_argument("--max-object-frac", type=float, default=0.3, help="largest object extent / image side")
    p.add_argument("--expressions-per-object", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    args = p.parse_args(argv)
    start = time.perf_counter()
    scenes = generate(
        args.out,
        args.num_images,
        args.size,
        args.seed,
        neg_ratio=args.neg_ratio,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        min_object_frac=args.min_object_frac,
        max_object_frac=args.max_object_frac,
        expressions_per_object=args.expressions_per_object,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    n_expr = sum(len(s.descriptions) for s in scenes)
    counts = {k: sum(s.split == k for s in scenes) for k in ("train", "val", "test")}
    print(
        f"wrote {len(scenes)} images ({counts}) with {n_expr} expressions to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
