"""The training/evaluation batch: B images and N >= B referring expressions."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Tuple

import torch


@dataclass
class Batch:
    """One collated batch.

    Shapes (B images, N expressions, R network resolution, L token length):
      images         (B,3,R,R) float, ImageNet-normalised
      masks          (N,R,R) bool, ground truth at network resolution (all-False for no-target expressions)
      expr_to_image  (N,) long, index into ``images`` of each expression
      input_ids      (N,L) long, right-padded with 0
      attention_mask (N,L) long, 1 on real tokens
      is_negative    (N,) bool, True for no-target expressions
      orig_sizes     (B,2) long, (h, w) of each image before resizing
      categories     N category names
      sample_ids     N (image name, annotation index) pairs; negatives use index -1 - k
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
