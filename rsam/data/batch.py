"""The training/evaluation batch: B images and N >= B referring expressions."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info



@dataclass
class Batch:
    """One collated batch.

    Shapes (B images, N expressions, R network resolution, L token length):
      images         (B,3,R,R) uint8 pixels (the model normalises them); from the collate a channels-last view
                     of (B,R,R,3) memory (``images.permute(0, 2, 3, 1)`` is contiguous)
      masks          (N,R,R) bool, ground truth at network resolution (all-False for no-target expressions)
      expr_to_image  (N,) long, index into ``images`` of each expression
      input_ids      (N,L) long, right-padded with 0
      attention_mask (N,L) long, 1 on real tokens
      is_negative    (N,) bool, True for no-target expressions
      orig_sizes     (B,2) long, (h, w) of each image before resizing
      categories     N category names
      sample_ids     N (image name, annotation index) pairs; negatives use index -1 - k
      expr_valid     (N,) bool or None: False on the padding rows of a static-shape batch (``Collator``
                     with ``static_shapes``); None when every row is a real expression
      num_valid      the number of real expressions (a host int, filled in from ``expr_valid``)
    """

    images: torch.Tensor
    masks: torch.Tensor
    expr_to_image: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    is_negative: torch.Tensor
    orig_sizes: torch.Tensor
    categories: List[str]
    sample_ids: List[Tuple[str, int]]
    expr_valid: Optional[torch.Tensor] = None
    num_valid: Optional[int] = None

    def __post_init__(self) -> None:
        # Shapes always (metadata only); expression indices only while on the CPU, where reading them costs no
        # device sync. The collate builds every batch on the CPU, so the training path is checked once, here.
        b, n = self.images.shape[0], self.input_ids.shape[0]
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"Batch.images must be uint8 (B,3,R,R), got {self.images.dtype} {tuple(self.images.shape)}")
        for name in ("masks", "expr_to_image", "attention_mask", "is_negative", "expr_valid"):
            if getattr(self, name) is not None and getattr(self, name).shape[0] != n:
                raise ValueError(f"Batch.{name} has {getattr(self, name).shape[0]} rows for {n} expressions")
        if len(self.categories) != n or len(self.sample_ids) != n:
            raise ValueError(f"Batch: {len(self.categories)} categories and {len(self.sample_ids)} sample ids for "
                             f"{n} expressions")
        if self.expr_to_image.device.type == "cpu" and n:
            lo, hi = int(self.expr_to_image.min()), int(self.expr_to_image.max())
            if lo < 0 or hi >= b:
                raise ValueError(f"Batch.expr_to_image must index the {b} images, got values {lo}..{hi}")
        if self.num_valid is None:
            if self.expr_valid is not None and self.expr_valid.device.type != "cpu":
                raise ValueError("Batch: num_valid must be given with a device-resident expr_valid")
            self.num_valid = n if self.expr_valid is None else int(self.expr_valid.sum())

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_expressions(self) -> int:
        return self.input_ids.shape[0]

    def _map_tensors(self, fn) -> "Batch":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return Batch(**values)

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        # Called by DataLoader(pin_memory=True) on custom batch types.
        return self._map_tensors(lambda t: t.pin_memory())


# ---------------------------------------------------------------------------------------------------------------
# Per-image samples and their collation into a Batch.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSample:
    """What the dataset returns for one image: k expressions, the image's own records in annotation order, then
    no-target expressions drawn from other images.

      image           (3,R,R) uint8
      masks           (k,R,R) bool (all-False rows for negatives)
      descriptions    k expressions (raw text; tokenised in the collate)
      categories      k category names (for a negative: the category of the object it was taken from)
      annotation_ids  k indices into the image's annotation list; negatives drawn from other images use -1 - j
      is_negative     k flags: no-target expression (drawn from another image, or an empty record of this one)
      orig_size       (h, w) of the image file
      epoch           training epoch it was drawn for (seeds the collate's subsampling)
    """

    name: str
    image: torch.Tensor
    masks: torch.Tensor
    descriptions: List[str]
    categories: List[str]
    annotation_ids: List[int]
    is_negative: List[bool]
    orig_size: Tuple[int, int]
    epoch: int = 0

    @property
    def num_expressions(self) -> int:
        return len(self.descriptions)


def cap_expressions(
    counts: Sequence[int], max_total: Optional[int], rng: np.random.Generator
) -> List[np.ndarray]:
    """Indices of the expressions each image keeps so that the batch holds at most ``max_total``.

    Every image keeps one random expression; the rest of the budget is a uniform random subset of the remaining
    expressions (the official rule). If the batch has more images than ``max_total``, each keeps exactly one.
    Kept indices are returned sorted, so expressions stay in annotation order.
    """
    counts = [int(c) for c in counts]
    if max_total is None or sum(counts) <= max_total:
        return [np.arange(c) for c in counts]
    kept = [[int(rng.integers(c))] if c > 0 else [] for c in counts]
    pool = [(i, j) for i, c in enumerate(counts) for j in range(c) if j != (kept[i][0] if kept[i] else -1)]
    budget = max(max_total - sum(len(k) for k in kept), 0)
    for p in rng.choice(len(pool), size=min(budget, len(pool)), replace=False):
        i, j = pool[int(p)]
        kept[i].append(j)
    return [np.sort(np.asarray(k, dtype=np.int64)) for k in kept]


class Collator:
    """``DataLoader`` collate function: list of :class:`ImageSample` -> :class:`Batch`.

    Args:
        tokenizer: callable ``texts -> (input_ids, attention_mask)``, e.g. ``rsam.data.tokenizer.RSAMTokenizer``.
        max_expressions_per_batch: cap on N (official: 24 for training, none for evaluation).
        seed: seeds the subsampling together with the epoch and the image names, so a batch is reproducible
            whichever worker collates it.
        static_shapes: pad every batch to exactly ``max_expressions_per_batch`` expressions and the tokenizer's
            ``max_tokens`` tokens (for ``torch.compile`` without recompilation). Padding rows repeat the batch's
            first expression and are marked in ``Batch.expr_valid`` (the loss ignores them); padding tokens have
            attention mask 0. Needs the tokenizer's ``standard`` mode (the one that truncates).

    ``None`` samples (images skipped with ``skip_bad_samples``) are dropped; a batch with no sample left gives
    ``None``. Inside a dataloader worker the image and mask tensors are written straight into shared memory
    (as ``default_collate`` does), which saves the copy the worker would otherwise make to send them.
    """

    def __init__(
        self,
        tokenizer,
        max_expressions_per_batch: Optional[int] = None,
        seed: int = 0,
        static_shapes: bool = False,
    ):
        if max_expressions_per_batch is not None and max_expressions_per_batch < 1:
            raise ValueError(f"max_expressions_per_batch must be >= 1 or None, got {max_expressions_per_batch}")
        if static_shapes:
            if max_expressions_per_batch is None:
                raise ValueError("Collator: static_shapes needs max_expressions_per_batch (the padded N)")
            if getattr(tokenizer, "mode", "standard") != "standard" or not hasattr(tokenizer, "max_tokens"):
                raise ValueError("Collator: static_shapes needs a tokenizer in 'standard' mode (it truncates to "
                                 "max_tokens; 'official' mode has no length bound)")
        self.tokenizer = tokenizer
        self.max_expressions_per_batch = max_expressions_per_batch
        self.seed = int(seed)
        self.static_shapes = bool(static_shapes)

    def __call__(self, samples: Sequence[Optional[ImageSample]]) -> Optional[Batch]:
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        for s in samples:
            if s.num_expressions == 0:
                raise ValueError(f"image {s.name!r} reached the collate with no expression")
        names = "\n".join(s.name for s in samples)
        rng = np.random.default_rng([self.seed, samples[0].epoch, zlib.crc32(names.encode("utf-8"))])
        keep = cap_expressions([s.num_expressions for s in samples], self.max_expressions_per_batch, rng)

        masks, expr_to_image, texts, categories, sample_ids, negative = [], [], [], [], [], []
        for i, (s, idx) in enumerate(zip(samples, keep)):
            masks.append(s.masks if len(idx) == s.num_expressions else s.masks[torch.from_numpy(idx)])
            expr_to_image.extend([i] * len(idx))
            for j in idx.tolist():
                texts.append(s.descriptions[j])
                categories.append(s.categories[j])
                sample_ids.append((s.name, int(s.annotation_ids[j])))
                negative.append(bool(s.is_negative[j]))
        input_ids, attention_mask = self.tokenizer(texts)
        # Pixels stay in (R,R,3) order, as decoded: the batch is a channels-last (B,3,R,R) view, so filling it is
        # a plain memcpy per image; the model's normalisation does the reordering (on the GPU when training).
        c, h, w = samples[0].image.shape
        images = _empty((len(samples), h, w, c), torch.uint8).permute(0, 3, 1, 2)
        for dst, s in zip(images, samples):
            dst.copy_(s.image)
        n_real = len(texts)
        pad = self.max_expressions_per_batch - n_real if self.static_shapes else 0
        masks_out = _empty((n_real + pad, *samples[0].masks.shape[1:]), torch.bool)
        torch.cat([m.bool() for m in masks] + [masks[0][:1].bool().expand(pad, -1, -1)], out=masks_out)
        expr_valid = None
        if self.static_shapes:
            input_ids, attention_mask = _pad_tokens(input_ids, attention_mask, self.tokenizer.max_tokens,
                                                    self.tokenizer.pad_id)
            input_ids = torch.cat([input_ids, input_ids[:1].expand(pad, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(pad, -1)])
            expr_to_image += [0] * pad
            negative += [negative[0]] * pad
            categories += [categories[0]] * pad
            sample_ids += [sample_ids[0]] * pad
            expr_valid = torch.arange(n_real + pad) < n_real
        return Batch(
            images=images,
            masks=masks_out,
            expr_to_image=torch.tensor(expr_to_image, dtype=torch.long),
            input_ids=input_ids,
            attention_mask=attention_mask,
            is_negative=torch.tensor(negative, dtype=torch.bool),
            orig_sizes=torch.tensor([list(s.orig_size) for s in samples], dtype=torch.long),
            categories=categories,
            sample_ids=sample_ids,
            expr_valid=expr_valid,
        )


def _pad_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
                pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (N, L) token ids and mask to (N, length)."""
    extra = length - input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"Collator: {input_ids.shape[1]} tokens exceed the static length {length}")
    return (torch.nn.functional.pad(input_ids, (0, extra), value=pad_id),
            torch.nn.functional.pad(attention_mask, (0, extra), value=0))


def _empty(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, in shared memory when called inside a dataloader worker."""
    if get_worker_info() is not None:
        try:  # the mechanism torch's default_collate uses
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
            return torch.empty(0, dtype=dtype).new(storage).view(shape)
        except (AttributeError, RuntimeError):  # private API moved: fall back to a plain tensor
            pass
    return torch.empty(shape, dtype=dtype)
