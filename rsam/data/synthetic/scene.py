"""Synthetic scenes: the object vocabulary, scene records and the procedural drawing of aerial-like images."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

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


def render(rng: np.random.Generator, size: int, specs: List[dict]) -> Tuple[np.ndarray, List[np.ndarray]]:
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


def layout(rng: np.random.Generator, size: int, n: int, min_frac: float, max_frac: float) -> List[dict]:
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
