"""Inference on one image at a time: image + referring expressions -> masks at the original image size.

    from rsam import RSAMPredictor

    predictor = RSAMPredictor.from_checkpoint("rsam_logs/exp/checkpoints/best.pt")
    predictor = RSAMPredictor.from_pretrained("user/rsam-b-plus")   # or a pretrained directory (rsam.pretrained)
    predictor.set_image("scene.jpg")                      # image features computed once
    for p in predictor.predict(["the red ship", "the airplane at the top left"]):
        print(p.text, p.mask.shape, p.iou_pred, "no target" if p.no_target else "")
    per_image = predictor.predict_batch(["a.jpg", "b.jpg"], [["the red ship"], ["the largest building"]])

What happens: the image is resized to the network resolution R (square, bilinear) exactly like the evaluation
transform, and the model normalises it; the image encoder runs once in :meth:`RSAMPredictor.set_image`.
:meth:`RSAMPredictor.predict` tokenises the expressions with the checkpoint's tokenizer settings, runs text
encoder, fusion and mask decoder for all of them in one batched call, and upsamples each low-resolution
(R/4) mask logit map bilinearly to the original (H, W) in one step, as SAM's predictors do.
:meth:`RSAMPredictor.predict_batch` runs the image encoder once on a batch of B images (B, 3, R, R) and the
decoder on the expressions of all of them together; its results equal per-image :meth:`predict` calls up to
floating-point reordering.

Padding: a model built with ``use_text_padding_mask: false`` (the official RSAM) lets padded text positions
take part in the fusion, so an expression's mask would depend on the longest expression of the call. The
predictor therefore batches only expressions of equal token length for such models (no padding, identical to
running each alone); with the padding mask on, every expression of the call goes into one decoder call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from rsam.data.images import ImageInput, load_image
from rsam.data.transforms import resize_image
from rsam.modeling.rsam import NO_OBJ_SCORE

__all__ = ["RSAMPredictor", "Prediction"]


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


class RSAMPredictor:
    """Masks for referring expressions on one image at a time (see the module docstring).

    Args:
        model: an :class:`rsam.modeling.rsam.RSAM` (put in eval mode here).
        tokenizer: callable ``texts -> (input_ids, attention_mask)`` with ``encode_batch`` and ``pad_id``
            (an :class:`rsam.data.tokenizer.RSAMTokenizer`).
        mask_threshold: a pixel is foreground where its logit is > this (0 = probability 0.5).
        max_batch: most expressions per decoder call (memory bound for long lists).
        config: the config the model was built from (``model`` and ``tokenizer`` nodes); needed by
            :meth:`save_pretrained`, set by :meth:`from_checkpoint` / :meth:`from_pretrained`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, mask_threshold: float = 0.0, max_batch: int = 64,
                 config: Optional[dict] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config  # the model + tokenizer config it was built from (for save_pretrained)
        self.mask_threshold = float(mask_threshold)
        self.max_batch = int(max_batch)
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
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> "RSAMPredictor":
        """Build the model and tokenizer described by a checkpoint and load its weights.

        Args:
            checkpoint: a training checkpoint, an official one (with ``config``), a pretrained directory or a
                Hub repo id (with ``revision``): see :func:`rsam.checkpoint.read_checkpoint`.
            config, device, overrides: see :func:`rsam.build.build_from_checkpoint`.
            vocab: tokenizer vocabulary, replacing the config's ``tokenizer.vocab``.
            **kwargs: passed to the constructor (``mask_threshold``, ``max_batch``).
        """
        from rsam.build import build_from_checkpoint
        from rsam.data.tokenizer import tokenizer_from_config

        model, cfg = build_from_checkpoint(checkpoint, config, device, overrides, revision=revision)
        where = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else None
        return cls(model, tokenizer_from_config(cfg, vocab, where), config=cfg, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, os.PathLike],
        revision: Optional[str] = None,
        device: Union[None, str, torch.device] = None,
        **kwargs: Any,
    ) -> "RSAMPredictor":
        """Load a pretrained directory or a Hub repo id (see :func:`rsam.pretrained.load_pretrained`).

        ``kwargs``: ``cache_dir``, ``local_files_only``, ``token`` go to the Hub lookup, the rest
        (``mask_threshold``, ``max_batch``) to the constructor.
        """
        from rsam.data.tokenizer import tokenizer_from_config
        from rsam.pretrained import load_pretrained

        hub = {k: kwargs.pop(k) for k in ("cache_dir", "local_files_only", "token") if k in kwargs}
        model, cfg = load_pretrained(path_or_repo_id, revision=revision, device=device, **hub)
        return cls(model, tokenizer_from_config(cfg), config=cfg, **kwargs)

    @classmethod
    def load(cls, source: Union[str, os.PathLike], config: Any = None, device: Union[None, str, torch.device] = None,
             revision: Optional[str] = None, **kwargs: Any) -> "RSAMPredictor":
        """Whatever ``source`` is: a checkpoint file (an official one with ``config``), a pretrained directory or
        a Hub repo id ("user/name"). ``kwargs``: as :meth:`from_checkpoint` (``vocab``, ``overrides``, ...)."""
        return cls.from_checkpoint(source, config=config, device=device, revision=revision, **kwargs)

    def save_pretrained(self, directory: Union[str, os.PathLike], **kwargs: Any):
        """Write the model and tokenizer as a pretrained directory (:func:`rsam.pretrained.save_pretrained`;
        ``kwargs``: ``metrics``, ``info``, ``card``) -> its path."""
        from rsam.pretrained import save_pretrained

        if self.config is None:
            raise ValueError("RSAMPredictor.save_pretrained: this predictor has no config (it was built from a "
                             "model): use rsam.pretrained.save_pretrained(model, config, directory)")
        return save_pretrained(self.model, self.config, directory, tokenizer=self.tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -------------------------------------------------------------------------------------------- image
    @torch.inference_mode()
    def set_image(self, image: ImageInput) -> None:
        """Load / convert ``image`` (see :func:`rsam.data.images.load_image`) and compute its features once."""
        rgb = load_image(image)
        pixels = resize_image(rgb, self.model.image_size)[None].to(self.device)  # uint8 (1, 3, R, R)
        self._features = self.model.encode_image(pixels)
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
        ids = self.check_texts(texts)
        texts = [texts] if isinstance(texts, str) else list(texts)
        outputs = self._decode_all(self._features, [0] * len(ids), ids)
        return [self._prediction(t, *out, self._orig_size, fill_hole_area, min_island_area)
                for t, out in zip(texts, outputs)]

    @torch.inference_mode()
    def predict_batch(
        self,
        images: Sequence[ImageInput],
        texts_per_image: Sequence[Union[str, Sequence[str]]],
        fill_hole_area: int = 0,
        min_island_area: int = 0,
    ) -> List[List[Prediction]]:
        """Masks for the expressions of several images, the image encoder run once on all of them.

        Args:
            images: B images (anything :func:`rsam.data.images.load_image` reads), of any sizes: each is resized
                to (R, R) and the batch (B, 3, R, R) goes through the image encoder in one call.
            texts_per_image: B entries, the expression(s) of each image (at least one each).
            fill_hole_area, min_island_area: as in :meth:`predict`.
        Returns:
            B lists of :class:`Prediction` (masks at each image's original size), in input order; equal to
            ``set_image(image); predict(texts)`` per image up to floating-point reordering. The current image
            of :meth:`set_image` is left as it was.
        """
        if len(images) != len(texts_per_image):
            raise ValueError(f"RSAMPredictor.predict_batch: {len(images)} images but {len(texts_per_image)} "
                             "expression lists")
        if not images:
            return []
        ids, owner, texts = [], [], []
        for b, entry in enumerate(texts_per_image):
            try:
                image_ids = self.check_texts(entry)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"image {b}: {exc}") from None
            ids += image_ids
            owner += [b] * len(image_ids)
            texts.append([entry] if isinstance(entry, str) else list(entry))
        rgbs = [load_image(image) for image in images]
        # Stacked in (R, R, 3) order, as the collate does: a plain copy; the model's normalisation reorders.
        hwc = torch.stack([resize_image(rgb, self.model.image_size).permute(1, 2, 0) for rgb in rgbs])
        pixels = hwc.permute(0, 3, 1, 2).to(self.device)
        features = self.model.encode_image(pixels)  # (B, 3, R, R) uint8 -> features of B images
        outputs = self._decode_all(features, owner, ids)
        results: List[List[Prediction]] = [[] for _ in images]
        flat = iter(outputs)
        for b, rgb in enumerate(rgbs):
            size = (int(rgb.shape[0]), int(rgb.shape[1]))
            for text in texts[b]:
                results[b].append(self._prediction(text, *next(flat), size, fill_hole_area, min_island_area))
        return results

    def check_texts(self, texts: Union[str, Sequence[str]]) -> List[List[int]]:
        """Validate expressions and tokenise them -> token ids per expression; ValueError / TypeError say which
        expression is wrong (empty, not a string, longer than the model takes)."""
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
        return ids

    def _decode_all(self, features, owner: List[int], ids: List[List[int]]) -> List[Tuple[torch.Tensor, float, float]]:
        """Decode expression i against image ``owner[i]`` of ``features`` -> per expression
        ``(low-res logits (R/4, R/4) float32 on the model's device, iou_pred, object_score)``."""
        out: List[Any] = [None] * len(ids)
        for group in self._groups(ids):
            dec = self._decode(features, [owner[i] for i in group], [ids[i] for i in group])
            iou = dec.iou_pred[:, 0].float().cpu()
            score = dec.object_score_logits[:, 0].float().cpu()
            for j, i in enumerate(group):
                out[i] = (dec.low_res_logits[j, 0].float(), float(iou[j]), float(score[j]))
        return out

    def _prediction(self, text: str, low_res: torch.Tensor, iou: float, score: float, size: Tuple[int, int],
                    fill_hole_area: int, min_island_area: int) -> Prediction:
        """One expression's low-res logits (R/4, R/4) -> :class:`Prediction` at the original ``size`` (H, W)."""
        h, w = size
        if score <= 0:  # gated: keep the exact constant (interpolation weights do not sum to 1 exactly)
            logits = torch.full((h, w), NO_OBJ_SCORE, device=low_res.device)
        else:  # one bilinear step from R/4 to the original size
            logits = F.interpolate(low_res[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        if fill_hole_area or min_island_area:
            from rsam.ops.postprocess import postprocess_masks

            logits = postprocess_masks(logits, int(fill_hole_area), int(min_island_area), self.mask_threshold)
        logits = logits.cpu()
        return Prediction(text=text, mask=logits > self.mask_threshold, logits=logits,
                          low_res_logits=low_res.cpu(), iou_pred=iou, object_score=score, no_target=score <= 0)

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

    def _decode(self, features, owner: List[int], ids: List[List[int]]):
        """N expressions (token ids) against images ``owner`` (N,) of ``features`` -> the model's RSAMOutput."""
        n, length = len(ids), max(len(s) for s in ids)
        pad = int(getattr(self.tokenizer, "pad_id", 0))
        input_ids = torch.full((n, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, seq in enumerate(ids):
            input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, :len(seq)] = 1
        device = self.device
        expr_to_image = torch.tensor(owner, dtype=torch.long)  # checked on the CPU by the model, then moved
        if device.type != "cpu":
            expr_to_image = expr_to_image.to(device)
        return self.model.decode(features, expr_to_image, input_ids.to(device), attention_mask.to(device))
