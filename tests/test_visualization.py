"""rsam.visualization: pictures that read at a glance.

What is checked: ``style="outline"`` leaves every pixel away from a mask's border equal to the input (inside and
outside the mask), ``style="fill"`` tints the inside; side-by-side pictures hold the untouched input on the
left; error maps are grey (R == G == B) wherever there is no TP / FP / FN and coloured where there is; the
TensorBoard comparison panel tints over grey too; bad arguments are named. A synthetic scene is drawn to
``$RSAM_PICTURES`` (default /tmp/rsam_pictures) for a person to look at.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rsam.visualization import (ERROR_COLORS, GAP, Caption, comparison_panel, draw_errors, draw_masks, greyed)


def _scene(size: int = 160):
    from rsam.data.synthetic import make_scene

    image, masks, objects, records = make_scene(np.random.default_rng(7), size, min_objects=4, max_objects=5)
    return image, masks, objects, records


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        out = out & np.roll(out, 1, 0) & np.roll(out, -1, 0) & np.roll(out, 1, 1) & np.roll(out, -1, 1)
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        out = out | np.roll(out, 1, 0) | np.roll(out, -1, 0) | np.roll(out, 1, 1) | np.roll(out, -1, 1)
    return out


def _picture(pil: Image.Image, h: int, w: int) -> np.ndarray:
    """The image part of a captioned picture at the input's scale (captions cut, enlargement undone)."""
    arr = np.asarray(pil)
    factor = arr.shape[1] // w
    return arr[: h * factor: factor, ::factor][:h, :w]


def test_outline_leaves_the_object_and_the_scene_as_they_are():
    image, masks, _, _ = _scene()
    h, w = image.shape[:2]
    mask = masks[0]
    out = _picture(draw_masks(image, [mask], [Caption("object")], style="outline"), h, w)
    thickness = max(2, round(min(h, w) / 150))
    inside = _erode(mask, thickness + 1)
    outside = ~_dilate(mask, 2)
    assert inside.sum() > 100 and np.array_equal(out[inside], image[inside])
    assert np.array_equal(out[outside], image[outside])
    border = mask & ~_erode(mask, 1)
    assert (out[border] != image[border]).any(axis=-1).mean() > 0.9  # the outline is drawn
    filled = _picture(draw_masks(image, [mask], [Caption("object")], style="fill"), h, w)
    assert (filled[inside] != image[inside]).any(axis=-1).mean() > 0.9  # the fill style tints the inside


def test_side_by_side_holds_the_input_on_the_left():
    image, masks, _, _ = _scene(120)
    h, w = image.shape[:2]
    pil = draw_masks(image, masks[:2], [Caption("a"), Caption("b")], style="outline", side_by_side=True)
    both = _picture(pil, h, 2 * w + GAP)
    assert np.array_equal(both[:, :w], image)
    assert not np.array_equal(both[:, w + GAP:], image)
    pil = draw_errors(image, masks[0], masks[1], side_by_side=True)
    assert np.array_equal(_picture(pil, h, 2 * w + GAP)[:, :w], image)


def test_error_map_is_grey_where_there_is_no_error_and_coloured_where_there_is():
    image, masks, _, _ = _scene()
    h, w = image.shape[:2]
    gt = masks[0]
    pred = np.roll(gt, 6, axis=1) | masks[1]  # shifted: TP, FP and FN, plus a wrong object
    out = _picture(draw_errors(image, pred, gt, text='"the object"'), h, w).astype(int)
    none = ~(pred | gt)
    assert np.array_equal(out[none], greyed(image)[none])
    assert (out[none][:, 0] == out[none][:, 1]).all() and (out[none][:, 1] == out[none][:, 2]).all()
    for name, region in (("TP", pred & gt), ("FP", pred & ~gt), ("FN", ~pred & gt)):
        assert region.sum() > 20
        colour = np.asarray(ERROR_COLORS[name])
        dominant = int(np.argmax(colour))
        pixels = out[region]
        # the legend's dominant channel clearly dominates the pixel: no scene colour survives
        assert (pixels[:, dominant] > pixels.max(axis=1) - 1).mean() > 0.99, name
        assert (pixels.max(axis=1) - pixels.min(axis=1) > 60).mean() > 0.99, name


def test_comparison_panel_tints_over_grey():
    image = torch.from_numpy(_scene(64)[0]).permute(2, 0, 1).contiguous()
    gt = torch.zeros(64, 64, dtype=torch.bool)
    gt[10:30, 10:30] = True
    panel = comparison_panel(image, gt, gt.clone())
    assert panel.shape == (3, 64, 192)
    background = panel[:, :, 64:128][:, ~gt]
    torch.testing.assert_close(background[0], background[1])
    torch.testing.assert_close(background[1], background[2])
    assert float((panel[1, :, 64:128][gt] - panel[0, :, 64:128][gt]).min()) > 0.2  # green inside the mask


def test_bad_arguments_are_named():
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="style must be one of"):
        draw_masks(image, [], [], style="glow")
    with pytest.raises(ValueError, match="mask 0 has shape"):
        draw_masks(image, [np.zeros((5, 5), bool)], [Caption("x")], style="outline")


def test_write_pictures_to_look_at():
    """One overlay and one error map of a synthetic scene, written for a person to look at."""
    out = os.environ.get("RSAM_PICTURES", "/tmp/rsam_pictures")
    os.makedirs(out, exist_ok=True)
    image, masks, objects, records = _scene(256)
    texts = [(t, k) for t, k, _ in records if k is not None][:3]
    captions = [Caption(f'"{t}"', None, f"{objects[k].colour} {objects[k].category}, {objects[k].area} px")
                for t, k in texts]
    overlay = draw_masks(image, [masks[k] for _, k in texts], captions, style="outline", side_by_side=True,
                         title="synthetic scene (256x256), outline style")
    overlay.save(os.path.join(out, "overlay_outline.png"))
    gt = masks[texts[0][1]]
    pred = np.roll(gt, 8, axis=1) | masks[texts[1][1]]
    errors = draw_errors(image, pred, gt, text=f'"{texts[0][0]}"', detail="shifted prediction + a wrong object",
                         side_by_side=True)
    errors.save(os.path.join(out, "errors.png"))
    for name in ("overlay_outline.png", "errors.png"):
        Image.open(os.path.join(out, name)).load()


def test_fill_stays_visible_on_a_red_object():
    """The default colour of a mask over a red object is far from red, so a fill over it changes what a person
    sees (a red fill on a red ship used to leave it almost as it was); the dark line outside marks the border
    in fill mode too; several masks get distinct colours."""
    from rsam.data.synthetic import make_scene
    from rsam.visualization import HALO, PALETTE, mask_colors

    for seed in range(100):
        image, masks, objects, _ = make_scene(np.random.default_rng(seed), 128)
        reds = [k for k, o in enumerate(objects) if o.colour == "red"]
        if reds:
            break
    red = masks[reds[0]]
    h, w = image.shape[:2]
    out = _picture(draw_masks(image, [red], [Caption("the red object")], style="fill"), h, w).astype(int)
    inside = _erode(red, 2)
    assert np.abs(out[inside] - image[inside].astype(int)).sum(axis=1).mean() > 120
    ring = _dilate(red, 1) & ~red
    assert (out[ring] == np.asarray(HALO)).all(axis=1).mean() > 0.9
    (colour,) = mask_colors(image, [red])
    assert np.abs(np.asarray(colour) - np.median(image[red], axis=0)).sum() > 300 and colour in PALETTE
    colours = mask_colors(image, masks)
    assert len(set(colours)) == len(masks)
