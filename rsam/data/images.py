"""Reading user images (files, PIL images, arrays, tensors) into uint8 RGB arrays for inference.

Grayscale is replicated to RGB, an alpha channel is dropped (with a warning when it holds transparency),
palette / CMYK images are converted. High-bit-depth inputs are refused with :class:`ImageInputError`: how to
scale them to 8 bits is a choice only the user can make.
"""
from __future__ import annotations

import logging
import os
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rsam.errors import UserError

__all__ = ["ImageInput", "ImageInputError", "load_image"]

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class ImageInputError(UserError):
    """An image that cannot be used as RSAM input; the message says what and how to fix it."""


# PIL modes whose pixels do not fit in 8 bits per channel.
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_MULTIBAND_HINT = "select three bands (e.g. R, G, B) and scale them to uint8 (0-255) first"


def _pil_bit_depth(image: Image.Image) -> int:
    """Bits per channel of the file behind a lazily opened PIL image (PIL reads 16-bit RGB as 8-bit)."""
    if image.mode in _HIGH_BIT_MODES:
        return 32 if image.mode in ("I", "F") else 16
    bits = getattr(image, "tag_v2", {}).get(258) if hasattr(image, "tag_v2") else None  # TIFF BitsPerSample
    if bits:
        return max(int(b) for b in (bits if isinstance(bits, (tuple, list)) else (bits,)))
    for tile in getattr(image, "tile", None) or []:
        raw = tile.args[0] if isinstance(tile.args, tuple) else tile.args
        if isinstance(raw, str) and ";16" in raw:
            return 16
    return 8


def _from_pil(image: Image.Image, where: str) -> np.ndarray:
    depth = _pil_bit_depth(image)
    if depth > 8:
        raise ImageInputError(
            f"{where}: {depth}-bit image (PIL mode {image.mode}); RSAM expects 8-bit RGB. Scale it to 0-255 "
            "yourself (e.g. a percentile stretch of each band) and pass a uint8 (H, W, 3) array, or save it as "
            "an 8-bit JPEG/PNG")
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.getchannel("A")) if "A" in image.getbands() else None
        if alpha is not None and alpha.min() < 255:
            log.warning("%s: the image has transparent pixels; the alpha channel is ignored", where)
    if mode != "RGB":
        if mode not in ("L", "1", "P", "PA", "LA", "La", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            raise ImageInputError(f"{where}: unsupported PIL image mode {mode!r}; {_MULTIBAND_HINT}")
        image = image.convert("RGB")
    return np.asarray(image)


def _from_array(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageInputError(
            f"{where}: expected an (H, W), (H, W, 1|3|4) or (1|3|4, H, W) image, got shape {tuple(array.shape)}; "
            f"for multispectral data {_MULTIBAND_HINT}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if np.isnan(array).any() or lo < 0.0 or hi > 1.0:
            raise ImageInputError(
                f"{where}: float images must hold values in [0, 1] (got min {lo:g}, max {hi:g}); pass uint8 0-255 "
                "or scale to [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        raise ImageInputError(
            f"{where}: {array.dtype} image (max {int(array.max())}); RSAM expects 8-bit RGB. Scale it to 0-255 "
            "yourself (e.g. a percentile stretch of each band) and pass a uint8 array")
    else:
        raise ImageInputError(f"{where}: unsupported image dtype {array.dtype}; pass uint8 (H, W, 3)")
    if array.shape[2] == 4:
        if array[..., 3].min() < 255:
            log.warning("%s: the image has transparent pixels; the alpha channel is ignored", where)
        array = array[..., :3]
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)  # grayscale: the network was trained on RGB
    return np.ascontiguousarray(array)


def load_image(image: ImageInput) -> np.ndarray:
    """Read / convert an image to a uint8 (H, W, 3) RGB array.

    Accepts a file path, a ``PIL.Image``, a numpy array or a torch tensor ((H, W), (H, W, C) or (C, H, W) with
    C in 1, 3, 4; uint8, or float in [0, 1]). Grayscale is replicated to RGB, an alpha channel is dropped,
    palette / CMYK images are converted. 16-bit and other high-bit-depth inputs are rejected with
    :class:`ImageInputError` (their scaling to 8 bits is a choice only the user can make).
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                depth = _pil_bit_depth(im)  # before loading: PIL may down-convert 16-bit RGB silently
                if depth > 8:
                    raise ImageInputError(
                        f"{path}: {depth}-bit image (PIL mode {im.mode}); RSAM expects 8-bit RGB. Scale it to "
                        "0-255 yourself (e.g. a percentile stretch of each band) and pass a uint8 (H, W, 3) "
                        "array, or save it as an 8-bit JPEG/PNG")
                im.load()
                return _from_pil(im, path)
        except ImageInputError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # DecompressionBombError: PIL's guard (PIL.Image.MAX_IMAGE_PIXELS) refused the header's size
            raise ImageInputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if isinstance(image, Image.Image):
        return _from_pil(image, "image")
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu().numpy(), "image tensor")
    if isinstance(image, np.ndarray):
        return _from_array(image, "image array")
    raise ImageInputError(
        f"set_image: expected a path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}")
