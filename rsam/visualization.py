"""Pictures a person looks at: masks over the image with captions, and TP / FP / FN error maps.

Everything works on uint8 RGB arrays (H, W, 3) and bool masks (H, W) of the same size and returns a
``PIL.Image`` (the picture plus a caption panel underneath), ready for ``.save("x.png")``. Only numpy and
Pillow are used, so the functions run anywhere the predictor runs.

So that the pictures read at a glance:

* :func:`draw_masks` ``style="outline"`` draws only each mask's border (a coloured band inside the mask with a
  thin dark line just outside it) and leaves every other pixel as it is: an object keeps its own colour (a red
  outline over a yellow building does not turn it "orange"). ``side_by_side=True`` puts the untouched input
  left of the overlay. ``style="fill"`` tints the inside as well and keeps the dark line outside.
* Mask colours are picked per picture (:func:`mask_colors`): each mask gets the palette colour farthest from the
  pixels it covers, so a fill on a red ship is not red.
* :func:`draw_errors` draws TP / FP / FN over a grey (desaturated, dimmed) copy of the image, so the legend
  colours cannot be confused with the scene (a red ship is not a false positive); ``side_by_side=True`` adds
  the colour input on the left.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # comparison_panel works on tensors; everything else needs only numpy and Pillow
    import torch

__all__ = ["PALETTE", "ERROR_COLORS", "STYLES", "Caption", "draw_masks", "draw_errors", "mask_to_png",
           "mask_colors", "comparison_panel", "greyed"]

Color = Tuple[int, int, int]

# Saturated colours that stay distinguishable on typical aerial imagery (greens, greys, browns). Red comes late:
# red objects are common (the synthetic scenes of rsam/data/synthetic/scene.py have red ships and buildings),
# and draw_masks picks, per mask, the palette colour farthest from the pixels it covers (mask_colors).
PALETTE: Tuple[Color, ...] = (
    (0, 220, 255),
    (255, 0, 200),
    (255, 214, 0),
    (150, 60, 255),
    (140, 255, 0),
    (255, 128, 0),
    (255, 48, 48),
    (0, 90, 255),
)
MIN_WIDTH = 480  # pixels; smaller pictures are enlarged before the captions are drawn
ERROR_COLORS = {"TP": (40, 220, 60), "FP": (255, 40, 40), "FN": (40, 120, 255)}
STYLES = ("outline", "fill")
HALO = (0, 0, 0)  # the thin line just outside an outline, so that it stands out on any background
GAP = 6  # pixels between the panels of a side-by-side picture
COLOR_SAMPLES = 4096  # mask pixels compared with each palette colour (a strided subset of larger masks)


@dataclass
class Caption:
    """One caption row: a colour swatch (None: no swatch), the text, and an optional dimmed detail."""

    text: str
    color: Optional[Color] = None
    detail: str = ""


# ------------------------------------------------------------------------------------------------------------
# helpers


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow >= 10.1 ships a scalable default font when FreeType is available; older ones a fixed bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _check(image: np.ndarray, masks: Sequence[np.ndarray]) -> Tuple[int, int]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"visualization: image must be a uint8 (H, W, 3) array, got {what}")
    h, w = image.shape[:2]
    for i, m in enumerate(masks):
        if m.shape != (h, w):
            raise ValueError(f"visualization: mask {i} has shape {m.shape}, the image is {(h, w)}")
    return h, w


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` px of its border (bool (H, W))."""
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        # 4-neighbour erosion; pixels outside the image count as background, so masks touching the
        # border get an outline there too
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def _outer_ring(mask: np.ndarray) -> np.ndarray:
    """Background pixels 8-adjacent to ``mask`` (bool (H, W)): a 1-px line just outside it."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return grown & ~mask


def greyed(image: np.ndarray, dim: float = 0.5, floor: float = 40.0) -> np.ndarray:
    """A grey, dimmed copy of an RGB image: uint8 (H, W, 3) with R == G == B = floor + dim * luma (BT.601).

    With the defaults the values span [40, 168]: dark enough for saturated legend colours to stand out, light
    enough to keep the scene recognisable.
    """
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.clip(np.round(floor + dim * luma), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _beside(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two (H, W, 3) uint8 pictures side by side with a dark gap of ``GAP`` px: (H, 2W + GAP, 3)."""
    gap = np.full((left.shape[0], GAP, 3), (24, 24, 28), dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def _tint(canvas: np.ndarray, mask: np.ndarray, color: Color, alpha: float) -> None:
    """In place: blend ``color`` into ``canvas`` (float32 (H, W, 3)) where ``mask``."""
    canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * np.asarray(color, dtype=np.float32)


def _with_captions(picture: np.ndarray, rows: Sequence[Caption], title: str = "") -> Image.Image:
    """The picture with a dark caption panel underneath: an optional title line, then one row per caption.

    Pictures narrower than ``MIN_WIDTH`` are enlarged by an integer factor (nearest neighbour, so every
    pixel stays a crisp square) to leave the captions room.
    """
    factor = -(-MIN_WIDTH // picture.shape[1])
    if factor > 1:
        picture = np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)
    h, w = picture.shape[:2]
    size = int(np.clip(round(w / 36), 12, 28))
    font, small = _font(size), _font(max(10, int(size * 0.8)))
    pad, swatch = size // 2, size
    line_h = int(size * 1.35)
    text_x = pad + swatch + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    avg_char = max(probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26.0, 1.0)
    width_chars = max(int((w - text_x - pad) / avg_char), 10)

    lines: List[Tuple[Optional[Color], str, str]] = []  # (swatch colour on the first line, text, detail)
    if title:
        for part in textwrap.wrap(title, max(int((w - 2 * pad) / avg_char), 10)) or [""]:
            lines.append((None, part, "title"))
    for row in rows:
        wrapped = textwrap.wrap(row.text, width_chars) or [""]
        for j, part in enumerate(wrapped):
            lines.append((row.color if j == 0 else None, part, ""))
        if row.detail:
            lines.append((None, row.detail, "detail"))
    panel_h = pad + line_h * len(lines) + pad
    out = Image.new("RGB", (w, h + panel_h), (24, 24, 28))
    out.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(out)
    y = h + pad
    for color, text, kind in lines:
        if kind == "title":
            draw.text((pad, y), text, fill=(235, 235, 235), font=font)
        else:
            if color is not None:
                top = y + (line_h - swatch) // 2
                draw.rectangle([pad, top, pad + swatch, top + swatch], fill=color, outline=(255, 255, 255))
            fill = (170, 170, 175) if kind == "detail" else (245, 245, 245)
            draw.text((text_x, y + (line_h - size) // 2), text, fill=fill, font=small if kind == "detail" else font)
        y += line_h
    return out


def _color_distance(pixels: np.ndarray, color: Color) -> float:
    """How far ``color`` is from most of ``pixels`` ((n, 3) float): the 10th percentile of a channel-weighted
    RGB distance (green weighs most, as the eye sees it), so that a few odd pixels do not decide."""
    weights = np.array([2.0, 4.0, 3.0], dtype=np.float32)
    diff = pixels - np.asarray(color, dtype=np.float32)
    return float(np.percentile(np.sqrt((diff * diff) @ weights), 10))


def mask_colors(image: np.ndarray, masks: Sequence[np.ndarray], palette: Sequence[Color] = PALETTE,
                taken: Sequence[Color] = ()) -> List[Color]:
    """One colour per mask that stands out on what the mask covers: the palette colour farthest from the mask's
    pixels, among those no earlier mask (nor ``taken``) uses while unused ones remain; an empty mask gets the
    first unused one. Deterministic (a fixed stride subsamples large masks)."""
    _check(image, masks)
    used: List[Color] = [tuple(c) for c in taken]
    out: List[Color] = []
    for mask in masks:
        free = [tuple(c) for c in palette if tuple(c) not in used] or [tuple(c) for c in palette]
        pixels = image[np.asarray(mask, dtype=bool)]
        if len(pixels) == 0:
            choice = free[0]
        else:
            pixels = pixels[:: max(1, len(pixels) // COLOR_SAMPLES)].astype(np.float32)
            choice = max(free, key=lambda c: _color_distance(pixels, c))  # ties keep the palette order
        used.append(choice)
        out.append(choice)
    return out


# ------------------------------------------------------------------------------------------------------------
# public drawing functions


def draw_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    captions: Sequence[Caption],
    alpha: float = 0.45,
    title: str = "",
    style: str = "fill",
    side_by_side: bool = False,
) -> Image.Image:
    """Masks over the image, each in its colour, with a caption row per entry.

    Args:
        image: uint8 (H, W, 3).
        masks: bool (H, W) each; an empty mask draws nothing (e.g. a "no target" prediction).
        captions: one per mask (its ``color`` is used; None: :func:`mask_colors` picks one).
        alpha: tint opacity inside the mask (``style="fill"``).
        title: optional first caption line (e.g. the file name).
        style: ``"fill"``: tint inside + outline + a 1-px dark line outside; ``"outline"``: only a coloured
            band of about H/150 px inside each mask's border and the dark line, every other pixel as in the input.
        side_by_side: the untouched input on the left, the overlay on the right ((H, 2W + 6) picture).
    """
    if style not in STYLES:
        raise ValueError(f"draw_masks: style must be one of {STYLES}, got {style!r}")
    h, w = _check(image, masks)
    if len(captions) != len(masks):
        raise ValueError(f"draw_masks: {len(captions)} captions for {len(masks)} masks")
    canvas = image.astype(np.float32)
    thickness = max(1, round(min(h, w) / 300)) if style == "fill" else max(2, round(min(h, w) / 150))
    outlines = []
    if any(c.color is None for c in captions):
        picked = mask_colors(image, masks, taken=[c.color for c in captions if c.color is not None])
        captions = [c if c.color is not None else Caption(c.text, color, c.detail)
                    for c, color in zip(captions, picked)]
    for mask, cap in zip(masks, captions):
        mask = np.asarray(mask, dtype=bool)
        if style == "fill":
            _tint(canvas, mask, cap.color, alpha)
        outlines.append((mask, _boundary(mask, thickness), cap.color))
    for mask, _, _ in outlines:  # halos first: a neighbouring mask's outline is never hidden by a halo
        canvas[_outer_ring(mask)] = HALO
    for _, edge, color in outlines:  # outlines last, so an overlapping tint never hides a border
        canvas[edge] = color
    picture = canvas.round().astype(np.uint8)
    if side_by_side:
        picture = _beside(image, picture)
    return _with_captions(picture, captions, title)


def draw_errors(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray,
    text: str = "",
    alpha: float = 0.7,
    detail: str = "",
    side_by_side: bool = False,
) -> Image.Image:
    """Colour-coded errors over a grey copy of the image: true positives green, false positives red, false
    negatives blue; elsewhere the picture is grey (R == G == B, see :func:`greyed`).

    Args:
        image: uint8 (H, W, 3); pred, gt: bool (H, W).
        text: the expression (first caption row); detail: e.g. "IoU 0.734 | object score 2.31".
        alpha: opacity of the error colours.
        side_by_side: the colour input on the left, the error map on the right.
    """
    _check(image, [pred, gt])
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    canvas = greyed(image).astype(np.float32)
    tp, fp, fn = pred & gt, pred & ~gt, ~pred & gt
    for name, mask in (("TP", tp), ("FP", fp), ("FN", fn)):
        _tint(canvas, mask, ERROR_COLORS[name], alpha)
    counts = f"TP {int(tp.sum())} px | FP {int(fp.sum())} px | FN {int(fn.sum())} px"
    rows = [Caption(text, None, detail)] if text or detail else []
    rows += [Caption("true positive", ERROR_COLORS["TP"]), Caption("false positive", ERROR_COLORS["FP"]),
             Caption("false negative (missed)", ERROR_COLORS["FN"], counts)]
    picture = canvas.round().astype(np.uint8)
    if side_by_side:
        picture = _beside(image, picture)
    return _with_captions(picture, rows)


def mask_to_png(mask: np.ndarray) -> Image.Image:
    """bool (H, W) -> 8-bit grey PNG image, 255 = foreground (viewable and lossless)."""
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8))  # 2-D uint8 -> mode "L"


def comparison_panel(image: "torch.Tensor", gt: "torch.Tensor", pred: "torch.Tensor") -> "torch.Tensor":
    """TensorBoard panel: image | ground truth tinted green | prediction tinted red, the two tinted panels over
    a grey copy of the image (R == G == B outside the masks) so that the tints cannot be mistaken for the scene.

    image (3, R, R) uint8 (the network input); gt, pred (h, w) bool at the scoring resolution (the image is
    resized to it). Returns a (3, h, 3w) float tensor in [0, 1].
    """
    import torch
    import torch.nn.functional as F

    rgb = image.float()[None] / 255.0
    if tuple(rgb.shape[-2:]) != tuple(gt.shape):
        rgb = F.interpolate(rgb, size=tuple(gt.shape), mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = rgb[0]
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype).view(3, 1, 1)
    grey = ((40.0 / 255.0) + 0.5 * (rgb * luma).sum(0, keepdim=True)).expand_as(rgb)  # as greyed()

    def tint(mask: torch.Tensor, color: Color) -> torch.Tensor:
        c = torch.tensor(color, dtype=rgb.dtype).view(3, 1, 1) / 255.0
        return torch.where(mask[None], 0.4 * grey + 0.6 * c, grey)

    return torch.cat([rgb, tint(gt.bool(), (0, 255, 0)), tint(pred.bool(), (255, 0, 0))], dim=2)
