"""What an evaluation loader carries besides the :class:`rsam.data.batch.Batch`: texts and original-size masks.

:class:`EvalDataset` wraps a dataset of :class:`rsam.data.batch.ImageSample` and adds, per image, the
expressions' text and (for scoring at the original resolution) the ground truth decoded at the image's own
size, in the loader workers; :class:`EvalCollator` turns those items into ``(Batch, EvalExtras)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from rsam.data.batch import Batch, ImageSample

__all__ = ["EvalDataset", "EvalCollator", "EvalExtras", "original_gt_masks"]


def original_gt_masks(dataset, name: str, annotation_ids: Sequence[int], size: Tuple[int, int]) -> torch.Tensor:
    """Ground truth of ``annotation_ids`` of image ``name`` at its original ``size`` (h, w) -> bool (k, h, w).

    Negative ids (no-target expressions drawn from other images) and empty records give all-False masks.
    ``dataset`` is a :class:`rsam.data.dataset.ReferringDataset` (its reader and empty-record rule are used).
    """
    h, w = size
    out = torch.zeros((len(annotation_ids), h, w), dtype=torch.bool)
    wanted = {aid for aid in annotation_ids if aid >= 0}
    if not wanted:
        return out
    anns = {a.index: a for a in dataset.reader.load_annotations(name, keep_empty=dataset.keep_empty)}
    rows = [(j, anns[aid]) for j, aid in enumerate(annotation_ids) if aid >= 0 and not anns[aid].empty]
    if rows:
        decoded = dataset.reader.decode_masks(name, [a for _, a in rows], (h, w))
        out[[j for j, _ in rows]] = torch.from_numpy(np.ascontiguousarray(decoded)).bool()
    return out


class EvalDataset(Dataset):
    """Wraps an evaluation dataset of :class:`ImageSample`: item -> ``(sample, extras)``.

    ``extras`` holds what a :class:`Batch` does not: the expressions' text, and with ``original_masks`` the
    ground truth at the original image size (decoded here, i.e. in the loader workers).
    """

    def __init__(self, dataset, original_masks: bool = False):
        self.dataset = dataset
        self.original_masks = bool(original_masks)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample: Optional[ImageSample] = self.dataset[index]
        if sample is None:  # a bad image skipped by the dataset (skip_bad_samples)
            return None
        extras = {"descriptions": list(sample.descriptions)}
        if self.original_masks:
            extras["masks"] = original_gt_masks(self.dataset, sample.name, sample.annotation_ids, sample.orig_size)
        return sample, extras


@dataclass
class EvalExtras:
    """Per-expression extras in :class:`Batch` order: texts, and original-size GT masks (or None)."""

    texts: List[str]
    masks: Optional[List[torch.Tensor]]


class EvalCollator:
    """Collate for :class:`EvalDataset` items: ``(Batch, EvalExtras)``, or None when every image was skipped."""

    def __init__(self, collate: Callable[[Sequence[ImageSample]], Optional[Batch]]):
        self.collate = collate

    def __call__(self, items):
        items = [it for it in items if it is not None]
        batch = self.collate([s for s, _ in items]) if items else None
        if batch is None:
            return None
        texts, masks = {}, {}
        for sample, extras in items:
            for j, aid in enumerate(sample.annotation_ids):
                key = (sample.name, int(aid))
                texts[key] = extras["descriptions"][j]
                if "masks" in extras:
                    masks[key] = extras["masks"][j]
        ids = [tuple(s) for s in batch.sample_ids]
        return batch, EvalExtras([texts[k] for k in ids], [masks[k] for k in ids] if masks else None)
