"""Inference on one image at a time: image + referring expressions -> masks at the original image size.

    from rsam import RSAMPredictor

    predictor = RSAMPredictor.from_checkpoint("rsam_logs/exp/checkpoints/best.pt")
    predictor.set_image("scene.jpg")                      # image features computed once
    for p in predictor.predict(["the red ship", "the airplane at the top left"]):
        print(p.text, p.mask.shape, p.iou_pred, "no target" if p.no_target else "")

What happens: the image is resized to the network resolution R (square, bilinear) and ImageNet-normalised,
exactly like the evaluation transform; the image encoder runs once in :meth:`RSAMPredictor.set_image`.
:meth:`RSAMPredictor.predict` tokenises the expressions with the checkpoint's tokenizer settings, runs text
encoder, fusion and mask decoder for all of them in one batched call, and upsamples each low-resolution
(R/4) mask logit map bilinearly to the original (H, W) in one step, as SAM's predictors do.

Padding: a model built with ``use_text_padding_mask: false`` (the official RSAM) lets padded text positions
take part in the fusion, so an expression's mask would depend on the longest expression of the call. The
predictor therefore batches only expressions of equal token length for such models (no padding, identical to
running each alone); with the padding mask on, every expression of the call goes into one decoder call.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from rsam.config import compose_config
from rsam.data.transforms import Normalize, resize_image
from rsam.modeling.rsam import NO_OBJ_SCORE

__all__ = ["RSAMPredictor", "Prediction", "ImageInputError", "ConfigMismatchError", "load_image", "load_model",
           "build_tokenizer", "config_differences"]

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# PIL modes whose pixels do not fit in 8 bits per channel.
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_MULTIBAND_HINT = "select three bands (e.g. R, G, B) and scale them to uint8 (0-255) first"


class ImageInputError(ValueError):
    """An image that cannot be used as RSAM input; the message says what and how to fix it."""


class ConfigMismatchError(ValueError):
    """A checkpoint's weights do not fit the model of the given config; the message names the keys."""


@dataclass
class Prediction:
    """The result for one expression. Tensors are on the CPU.

    mask (H, W) bool: at the original image size (``logits > mask_threshold``, after optional clean-up).
    logits (H, W) float32: mask logits at the original size; the constant -1024 everywhere when gated.
    low_res_logits (R/4, R/4) float32: the network's mask logits before upsampling.
    iou_pred: the model's estimate of the mask's IoU. object_score: the object-presence logit;
    ``no_target`` is True when it is <= 0, i.e. the model says the expression refers to nothing in the image
    (the mask is then empty).
    """

    text: str
    mask: torch.Tensor
    logits: torch.Tensor
    low_res_logits: torch.Tensor
    iou_pred: float
    object_score: float
    no_target: bool


# ------------------------------------------------------------------------------------------------------------
# image input


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
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageInputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if isinstance(image, Image.Image):
        return _from_pil(image, "image")
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu().numpy(), "image tensor")
    if isinstance(image, np.ndarray):
        return _from_array(image, "image array")
    raise ImageInputError(
        f"set_image: expected a path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}")


# ------------------------------------------------------------------------------------------------------------
# configs and checkpoints


_compose_yaml = compose_config  # kept for callers of the old private name


def _as_config(config: Any, overrides: Sequence[str] = ()):
    """A DictConfig from a YAML path, a dict or a DictConfig (overrides only for YAML paths)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, (str, os.PathLike)):
        return _compose_yaml(config, overrides)
    if overrides:
        raise ValueError("config overrides need a YAML config path")
    if isinstance(config, DictConfig):
        return config
    if isinstance(config, Mapping):
        return OmegaConf.create(dict(config))
    raise TypeError(f"config must be a YAML path, a dict or a DictConfig, got {type(config).__name__}")


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, (list, tuple)):
        return {prefix: [_flatten(v) if isinstance(v, Mapping) else v for v in node]}
    return {prefix: node}


def config_differences(a: Mapping, b: Mapping, prefix: str = "model") -> List[Tuple[str, Any, Any]]:
    """``(key, a value, b value)`` for every leaf that differs between two (plain, resolved) config trees."""
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    missing = object()
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float)) and float(va) == float(vb)):
            diffs.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
    return diffs


def _plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Mapping, Optional[dict]]:
    """(model state dict, stored config or None) of our checkpoint, or of a bare / official state dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {file}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip / EOF errors all mean "not a checkpoint we can read"
        raise ValueError(f"{file}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        config = obj.get("config")
        return obj["model"], dict(config) if isinstance(config, Mapping) else None
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError(f"{file}: expected our checkpoint ({{'model': state_dict, 'config': ...}}) or a state dict")


def _resolve_vocab(vocab: str, checkpoint: Optional[Path]) -> str:
    """A relative vocabulary path from a stored config is relative to the training run's working directory,
    which is unknown here: try the current directory, then the checkpoint's folder and its parents."""
    if os.path.isabs(vocab) or "://" in vocab:
        return vocab
    tried = [Path.cwd() / vocab]
    if checkpoint is not None:
        for parent in list(checkpoint.resolve().parents)[:4]:
            tried.append(parent / vocab)
    for candidate in tried:
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"tokenizer vocabulary {vocab!r} (tokenizer.vocab of the config) not found; tried "
        + ", ".join(str(t) for t in tried) + ". Pass vocab=<path to vocab.txt> (rsam-predict --vocab)")


def build_tokenizer(cfg: Mapping, vocab: Optional[str] = None, checkpoint: Optional[Path] = None):
    """The ``tokenizer:`` node of a config as an :class:`rsam.data.tokenizer.RSAMTokenizer`.

    ``vocab`` replaces the node's vocabulary path. A config without a tokenizer node (e.g. one written for an
    official checkpoint) gets the official convention (``[CLS]`` + word pieces, no ``[SEP]``) with ``vocab``.
    """
    from rsam.data.tokenizer import RSAMTokenizer

    node = dict(cfg.get("tokenizer") or {})
    node.pop("_target_", None)
    if vocab is None and not node.get("vocab"):
        raise ValueError("the config has no tokenizer.vocab; pass vocab=<path to the BERT vocab.txt>")
    if not node:
        log.warning("the config has no `tokenizer:` node: using the official tokenizer convention with %s", vocab)
        node = {"mode": "official"}
    node["vocab"] = vocab if vocab is not None else _resolve_vocab(str(node["vocab"]), checkpoint)
    try:
        return RSAMTokenizer(**node)
    except TypeError as exc:
        raise ValueError(f"config tokenizer node {node}: {exc}") from None


def load_model(
    checkpoint: Union[str, os.PathLike],
    config: Any = None,
    device: Union[None, str, torch.device] = None,
    overrides: Sequence[str] = (),
) -> Tuple[torch.nn.Module, dict]:
    """Build the model a checkpoint was trained as and load its weights -> ``(model in eval mode, config dict)``.

    Args:
        checkpoint: our checkpoint (``{"model", "config", ...}``; its stored config is used), or a bare /
            official RSAM state dict (then ``config`` is required).
        config: YAML path, dict or DictConfig replacing the stored config. Where its ``model`` node differs from
            the stored one, the differing keys are named: in a :class:`ConfigMismatchError` when the weights do
            not fit, in a warning when they do.
        device: default CUDA when available, else CPU.
        overrides: Hydra overrides applied to a YAML ``config`` (e.g. ``["model.image_size=512"]``).
    """
    from rsam.build import CheckpointError, build_rsam, model_config

    path = Path(checkpoint).expanduser()
    state_dict, stored = _read_checkpoint(path)
    if config is None and stored is None:
        raise ValueError(f"{path} holds no config (an official or bare state dict): pass a config "
                         "(config=<YAML>, --config) describing the model")
    cfg = _plain(_as_config(config, overrides)) if config is not None else stored
    where = "the config" if config is not None else f"the config stored in {path}"
    if not isinstance(cfg.get("model"), Mapping):
        raise KeyError(f"{where} has no `model:` node")
    diffs = config_differences(stored["model"], cfg["model"]) if (config is not None and stored) else []
    listing = "\n  ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = build_rsam(model_config(cfg), checkpoint=state_dict, device=device, mode="eval")
    except CheckpointError as exc:
        # the config keys first: they say why, the tensor list that follows says where
        detail = f"; its model node differs from the one stored in the checkpoint at:\n  {listing}\n" \
            if diffs else ":\n"
        raise ConfigMismatchError(f"{path} does not fit the model of {where}{detail}{exc}") from None
    if diffs:
        log.warning("%s: the config's model node differs from the one stored in the checkpoint (the weights "
                    "fit):\n  %s", path, listing)
    return model, cfg


# ------------------------------------------------------------------------------------------------------------
# the predictor


class RSAMPredictor:
    """Masks for referring expressions on one image at a time (see the module docstring).

    Args:
        model: an :class:`rsam.modeling.rsam.RSAM` (put in eval mode here).
        tokenizer: callable ``texts -> (input_ids, attention_mask)`` with ``encode_batch`` and ``pad_id``
            (an :class:`rsam.data.tokenizer.RSAMTokenizer`).
        mask_threshold: a pixel is foreground where its logit is > this (0 = probability 0.5).
        max_batch: most expressions per decoder call (memory bound for long lists).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, mask_threshold: float = 0.0, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mask_threshold = float(mask_threshold)
        self.max_batch = int(max_batch)
        self.normalize = Normalize()
        self._features = None
        self._orig_size: Optional[Tuple[int, int]] = None
        self._image: Optional[np.ndarray] = None

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, os.PathLike],
        config: Any = None,
        device: Union[None, str, torch.device] = None,
        vocab: Optional[str] = None,
        overrides: Sequence[str] = (),
        **kwargs: Any,
    ) -> "RSAMPredictor":
        """Build the model and tokenizer described by a checkpoint and load its weights.

        Args:
            checkpoint, config, device, overrides: see :func:`load_model`.
            vocab: tokenizer vocabulary, replacing the config's ``tokenizer.vocab``.
            **kwargs: passed to the constructor (``mask_threshold``, ``max_batch``).
        """
        model, cfg = load_model(checkpoint, config, device, overrides)
        tokenizer = build_tokenizer(cfg, vocab, Path(checkpoint).expanduser())
        return cls(model, tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -------------------------------------------------------------------------------------------- image
    @torch.inference_mode()
    def set_image(self, image: ImageInput) -> None:
        """Load / convert ``image`` (see :func:`load_image`) and compute its features once."""
        rgb = load_image(image)
        size = self.model.image_size
        x = self.normalize(resize_image(rgb, size))[None].to(self.device)
        self._features = self.model.encode_image(x)
        self._orig_size = (int(rgb.shape[0]), int(rgb.shape[1]))
        self._image = rgb

    def reset_image(self) -> None:
        self._features, self._orig_size, self._image = None, None, None

    @property
    def image(self) -> Optional[np.ndarray]:
        """The current image as uint8 (H, W, 3), or None."""
        return self._image

    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of the current image, or None."""
        return self._orig_size

    # -------------------------------------------------------------------------------------------- predict
    @torch.inference_mode()
    def predict(
        self,
        texts: Union[str, Sequence[str]],
        fill_hole_area: int = 0,
        min_island_area: int = 0,
    ) -> List[Prediction]:
        """Masks for one or more expressions on the current image.

        Args:
            texts: an expression or a list of them.
            fill_hole_area: fill background components of at most this many pixels (of the original image).
            min_island_area: remove foreground components smaller than this many pixels.
        Returns:
            one :class:`Prediction` per expression, in input order.
        """
        if self._features is None:
            raise RuntimeError("RSAMPredictor.predict: call set_image(image) first")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("RSAMPredictor.predict: no expression given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"RSAMPredictor.predict: expression {i} is a {type(t).__name__}, not a string")
            if not t.strip():
                raise ValueError(f"RSAMPredictor.predict: expression {i} is empty")
        ids = self.tokenizer.encode_batch(texts)
        max_tokens = self._max_tokens()
        for i, seq in enumerate(ids):
            if len(seq) > max_tokens:
                raise ValueError(f"RSAMPredictor.predict: expression {i} has {len(seq)} tokens, the model takes at "
                                 f"most {max_tokens} (max_text_tokens): shorten it")

        low_res = [None] * len(texts)
        iou = torch.zeros(len(texts))
        score = torch.zeros(len(texts))
        for group in self._groups(ids):
            out = self._decode([ids[i] for i in group])
            for j, i in enumerate(group):
                low_res[i] = out.low_res_logits[j, 0].float()
                iou[i] = out.iou_pred[j, 0].float().cpu()
                score[i] = out.object_score_logits[j, 0].float().cpu()

        h, w = self._orig_size
        results = []
        for i, text in enumerate(texts):
            if score[i] <= 0:  # gated: keep the exact constant (interpolation weights do not sum to 1 exactly)
                logits = torch.full((h, w), NO_OBJ_SCORE, device=low_res[i].device)
            else:  # one bilinear step from R/4 to the original size
                logits = F.interpolate(low_res[i][None, None], size=(h, w), mode="bilinear",
                                       align_corners=False)[0, 0]
            if fill_hole_area or min_island_area:
                from rsam.ops.postprocess import postprocess_masks

                logits = postprocess_masks(logits, int(fill_hole_area), int(min_island_area), self.mask_threshold)
            logits = logits.cpu()
            results.append(Prediction(
                text=text,
                mask=logits > self.mask_threshold,
                logits=logits,
                low_res_logits=low_res[i].cpu(),
                iou_pred=float(iou[i]),
                object_score=float(score[i]),
                no_target=bool(score[i] <= 0),
            ))
        return results

    def _max_tokens(self) -> int:
        """Longest expression the model takes: rows of the text position embedding and of BERT's."""
        limit = self.model.sam_prompt_encoder.description_pe.num_embeddings
        bert = getattr(getattr(self.model, "text_encoder", None), "config", None)
        return min(limit, int(getattr(bert, "max_position_embeddings", limit)))

    def _groups(self, ids: List[List[int]]) -> List[List[int]]:
        """Index groups decoded together: all (padding masked) or by token length (no padding at all)."""
        if getattr(self.model, "use_text_padding_mask", False):
            keys = [0] * len(ids)
        else:
            keys = [len(seq) for seq in ids]
        groups: Dict[int, List[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        out = []
        for members in groups.values():
            out.extend(members[s:s + self.max_batch] for s in range(0, len(members), self.max_batch))
        return out

    def _decode(self, ids: List[List[int]]):
        n, length = len(ids), max(len(s) for s in ids)
        pad = int(getattr(self.tokenizer, "pad_id", 0))
        input_ids = torch.full((n, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, seq in enumerate(ids):
            input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, :len(seq)] = 1
        device = self.device
        expr_to_image = torch.zeros(n, dtype=torch.long, device=device)
        return self.model.decode(self._features, expr_to_image, input_ids.to(device), attention_mask.to(device))
