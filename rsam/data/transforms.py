"""Image / mask transforms for training and evaluation.

Both transforms take one image with its k masks and k expressions and return tensors at the network resolution::

    image  PIL.Image | uint8 ndarray (H,W,3) | uint8 tensor (3,H,W)  ->  uint8 tensor (3,R,R)
    masks  bool/uint8 (k,H,W) ndarray or tensor                       ->  bool tensor (k,R,R)
    descriptions list[str] (any number: all texts that a flip must mirror)  ->  list[str]

Images stay uint8 all the way to the model, which normalises them (``RSAM.preprocess``): a float image is 4x the
bytes through the loader workers, the pinned memory and the host-to-device copy.

Train (official recipe): square resize (no aspect preservation) -> random black boxes (p=0.2). An optional
horizontal flip swaps left/right words in the expressions; it is off by default because the official recipe has
no flip. Eval: resize, fully deterministic (the official test set used the training augmentation by mistake;
docs/official_differences.md, B2).
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


def resize_image(image: ImageLike, resolution: int) -> torch.Tensor:
    """Square bilinear (antialiased when shrinking) resize -> uint8 tensor (3,R,R).

    The result is a channels-first *view* of the (R,R,3) pixel buffer. The collate keeps that layout (a strided
    HWC -> CHW copy costs as much as decoding the mask); the model's normalisation reorders the pixels.
    """
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be uint8 (3,H,W), got {tuple(image.shape)} {image.dtype}")
        if image.shape[1:] == (resolution, resolution):
            return image
        image = image.permute(1, 2, 0).contiguous().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be uint8 (H,W,3), got {image.shape} {image.dtype}")
        if image.shape[:2] == (resolution, resolution):  # a copy: black boxes are painted in place
            return torch.from_numpy(np.array(image)).permute(2, 0, 1)
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    # np.array: a writable copy of the pixels (PIL's buffer is read-only).
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def resize_masks(masks: Union[np.ndarray, torch.Tensor], resolution: int) -> torch.Tensor:
    """(k,H,W) binary -> bool (k,R,R).

    Resized as float with the same bilinear/antialias kernel as the image, then thresholded at 0.5, so the mask
    stays binary and aligned with the resized image (a nearest-neighbour resize would shift edges by up to a pixel).
    """
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (k,H,W), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return torch.zeros((0, resolution, resolution), dtype=torch.bool)
    if masks.shape[-2:] == (resolution, resolution):
        return masks.contiguous() if masks.dtype == torch.bool else (masks != 0).contiguous()
    resized = F.interpolate(
        masks[:, None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[:, 0] >= 0.5


def paint_black_boxes(
    image: torch.Tensor, rng: np.random.Generator, count: Tuple[int, int] = (20, 60), size: int = 32
) -> torch.Tensor:
    """Zero ``n ~ U{count}`` ``size``-px squares at uniform positions of a (C,H,W) image (in place; returns it).

    Positions are bounded by each axis separately (the official code used the width for both). Each box is one
    slice write -- at most 60 per image, no per-pixel work.
    """
    height, width = image.shape[-2:]
    n = int(rng.integers(count[0], count[1] + 1))
    ys = rng.integers(0, max(height - size, 0) + 1, size=n).tolist()
    xs = rng.integers(0, max(width - size, 0) + 1, size=n).tolist()
    for y, x in zip(ys, xs):
        image[..., y : y + size, x : x + size] = 0
    return image


_LR_WORDS = {
    "left": "right",
    "leftmost": "rightmost",
    "west": "east",
    "western": "eastern",
    "westernmost": "easternmost",
    "northwest": "northeast",
    "southwest": "southeast",
}
_LR_SWAP = {**_LR_WORDS, **{v: k for k, v in _LR_WORDS.items()}}
_LR_PATTERN = re.compile(r"\b(" + "|".join(sorted(_LR_SWAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Mirror the horizontal words of an expression ("left-most" -> "right-most", "West" -> "East")."""

    def repl(match: re.Match) -> str:
        word = match.group(0)
        swapped = _LR_SWAP[word.lower()]
        if word.isupper():
            return swapped.upper()
        if word[0].isupper():
            return swapped.capitalize()
        return swapped

    return _LR_PATTERN.sub(repl, text)


class EvalTransform:
    """Deterministic square resize to ``resolution``."""

    def __init__(self, resolution: int = 800):
        self.resolution = int(resolution)

    def __call__(
        self,
        image: ImageLike,
        masks: Union[np.ndarray, torch.Tensor],
        descriptions: List[str],
        rng: Optional[np.random.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        return resize_image(image, self.resolution), resize_masks(masks, self.resolution), list(descriptions)

    def __repr__(self) -> str:
        return f"EvalTransform(resolution={self.resolution})"


class TrainTransform:
    """Square resize -> [optional left/right-aware flip] -> random black boxes.

    Args:
        resolution: output side R.
        black_box_prob: probability per image of painting black boxes (official 0.2).
        black_box_count: inclusive range of the number of boxes (official 20-60).
        black_box_size: side of each box in pixels at the output resolution (official 32).
        hflip_prob: probability of a horizontal flip that also swaps left/right words (official: no flip).
    """

    def __init__(
        self,
        resolution: int = 800,
        black_box_prob: float = 0.2,
        black_box_count: Tuple[int, int] = (20, 60),
        black_box_size: int = 32,
        hflip_prob: float = 0.0,
    ):
        if not 0.0 <= black_box_prob <= 1.0 or not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"probabilities must be in [0,1], got black_box_prob={black_box_prob}, hflip_prob={hflip_prob}")
        self.resolution = int(resolution)
        self.black_box_prob = float(black_box_prob)
        self.black_box_count = (int(black_box_count[0]), int(black_box_count[1]))
        self.black_box_size = int(black_box_size)
        self.hflip_prob = float(hflip_prob)

    def __call__(
        self,
        image: ImageLike,
        masks: Union[np.ndarray, torch.Tensor],
        descriptions: List[str],
        rng: np.random.Generator,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        image_u8 = resize_image(image, self.resolution)
        masks_r = resize_masks(masks, self.resolution)
        descriptions = list(descriptions)
        if self.hflip_prob > 0 and rng.random() < self.hflip_prob:
            image_u8 = image_u8.flip(-1)
            masks_r = masks_r.flip(-1)
            descriptions = [swap_left_right(d) for d in descriptions]
        if self.black_box_prob > 0 and rng.random() < self.black_box_prob:
            # Zero in uint8 == zero in [0,1] space: the boxes are black before normalisation, as in the paper.
            paint_black_boxes(image_u8, rng, self.black_box_count, self.black_box_size)
        return image_u8, masks_r, descriptions

    def __repr__(self) -> str:
        return (
            f"TrainTransform(resolution={self.resolution}, black_box_prob={self.black_box_prob}, "
            f"black_box_count={self.black_box_count}, black_box_size={self.black_box_size}, "
            f"hflip_prob={self.hflip_prob})"
        )
