"""Per-image referring samples for training and evaluation: expression selection, no-target expressions, bad input.

Reads through a format reader (:mod:`rsam.data.readers`: risors, rrsisd, refsegrs, risbench, jsonl); the dataset
itself knows nothing of file formats.

No-target ("negative") expressions, as the paper describes and the official code fails to do
(docs/official_differences.md, B1): for each image draw ``k ~ Poisson(negative_ratio)`` expressions, uniformly
without replacement, among the split's expressions whose category does not occur in this image, and pair each
with an empty mask. Randomness:

* training: one ``numpy`` generator per (seed, epoch, image index) -- the same draws whatever the number of
  ranks or workers, and a run resumed mid-epoch redraws exactly what it would have drawn;
* evaluation: one generator per (seed, image index) -- the same negatives whatever the number of ranks/workers.

Bad input raises :class:`rsam.data.errors.DataError` naming the file and the problem. With
``skip_bad_samples=True`` the record or image is skipped instead, with a warning (once per file and problem per
process) and a counter that ``bad_sample_counts()`` reports across all dataloader workers (shared-memory
tensor, one row per worker).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from iopath.common.file_io import PathManager
from torch.utils.data import Dataset, get_worker_info

from rsam.data.batch import ImageSample
from rsam.data.errors import COUNT_KEYS, DataError
from rsam.data.readers import Annotation, open_reader
from rsam.data.transforms import EvalTransform, TrainTransform

__all__ = ["ReferringDataset"]

log = logging.getLogger(__name__)

_MAX_COUNTER_ROWS = 257  # row 0: main process, row w + 1: dataloader worker w


def _raise(err: DataError) -> None:
    raise err


def _worker_id() -> int:
    info = get_worker_info()
    return -1 if info is None else info.id


class ReferringDataset(Dataset):
    """Per-image referring samples (:class:`rsam.data.batch.ImageSample`) for training or evaluation.

    Args:
        root, split: dataset root and split name.
        format: the on-disk format (``rsam.data.readers.FORMATS``).
        reader_options: format-specific reader arguments (e.g. ``file_list`` for risors, ``dataset_name`` /
            ``split_by`` / ``prefix`` / ``shared_text`` for rrsisd, ``category_names`` for refsegrs / risbench).
        transform: ``(image, masks, descriptions, rng) -> (image, masks, descriptions)``; default
            ``TrainTransform(resolution)`` when training, ``EvalTransform(resolution)`` otherwise.
        training: random subsampling of expressions (up to ``max_expressions_per_image``) and retry-on-bad-sample;
            default: ``split == "train"``. Evaluation returns every expression of the image.
        resolution: network resolution R used for the default transform and JPEG draft decoding.
        max_expressions_per_image: training cap on the image's own expressions (official 4); negatives come on top.
        negative_ratio: mean number of no-target expressions per image (Poisson); 0 = official behaviour.
        seed: base seed of every random choice of the dataset.
        skip_bad_samples: skip and count bad records/images instead of raising.
        empty_annotations: ``"skip"`` (official: drop records with area <= 0) or ``"negative"`` (keep them as
            in-image no-target expressions with an empty mask).
        jpeg_draft: decode JPEGs at a reduced scale when R is at most half the image side.
        check_files: verify at construction that every listed image and annotation file exists.
        max_retries: training only, with ``skip_bad_samples``: how many replacement images to try.
    """

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        transform: Optional[Callable] = None,
        training: Optional[bool] = None,
        resolution: int = 800,
        max_expressions_per_image: Optional[int] = 4,
        negative_ratio: float = 0.0,
        seed: int = 0,
        skip_bad_samples: bool = False,
        empty_annotations: str = "skip",
        jpeg_draft: bool = True,
        check_files: bool = True,
        max_retries: int = 10,
        format: str = "risors",
        reader_options: Optional[Dict] = None,
        path_manager: Optional[PathManager] = None,
    ):
        if empty_annotations not in ("skip", "negative"):
            raise ValueError(f"empty_annotations must be 'skip' or 'negative', got {empty_annotations!r}")
        if negative_ratio < 0:
            raise ValueError(f"negative_ratio must be >= 0, got {negative_ratio}")
        if max_expressions_per_image is not None and max_expressions_per_image < 1:
            raise ValueError(f"max_expressions_per_image must be >= 1 or None, got {max_expressions_per_image}")
        self.format = format
        self.reader = open_reader(format, root, split, path_manager=path_manager, **(reader_options or {}))
        self.training = (split == "train") if training is None else bool(training)
        if transform is None:
            transform = TrainTransform(resolution) if self.training else EvalTransform(resolution)
        self.transform = transform
        self.resolution = int(getattr(transform, "resolution", resolution))
        self.max_expressions_per_image = max_expressions_per_image
        self.negative_ratio = float(negative_ratio)
        self.seed = int(seed)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.keep_empty = empty_annotations == "negative"
        self.jpeg_draft = bool(jpeg_draft)
        self.max_retries = int(max_retries)
        self.epoch = 0
        # Shared memory so that increments made in dataloader workers are visible to the main process.
        self._counts = torch.zeros((_MAX_COUNTER_ROWS, len(COUNT_KEYS)), dtype=torch.int64).share_memory_()
        self._warned: set = set()

        self.names: List[str] = list(self.reader.names)
        for problem in self.reader.problems:  # records no image owns (a malformed line, a ref without image)
            self._handle_bad(problem)
        if not self.names:
            raise DataError(self.reader.where, "no usable image in this split", "no_annotations")
        if check_files:
            self._drop_missing_files()
        self._build_negative_index()

    # ----------------------------------------------------------------------------------------------- bookkeeping
    @property
    def root(self) -> str:
        return self.reader.root

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        """Epoch for integer indices (the train sampler passes ``(index, epoch)`` pairs instead, which also works
        with persistent workers that never see this attribute change)."""
        self.epoch = int(epoch)

    def _count(self, reason: str) -> None:
        self._counts[_worker_id() + 1, COUNT_KEYS.index(reason)] += 1

    def _handle_bad(self, err: DataError) -> None:
        """Raise, or (skip_bad_samples) warn once per file and problem and count."""
        if not self.skip_bad_samples:
            raise err
        self._count(err.reason)
        if (err.path, err.problem) not in self._warned:
            self._warned.add((err.path, err.problem))
            log.warning("skipping bad sample: %s", err)

    def bad_sample_counts(self) -> Dict[str, int]:
        """Counts per problem since the last reset, summed over the main process and all dataloader workers.

        Keys: ``COUNT_KEYS``; ``zero_area`` counts records skipped because ``area <= 0`` (the format rule), the
        others bad input skipped with ``skip_bad_samples``. In a distributed run each rank counts its own share.
        """
        totals = self._counts.sum(0).tolist()
        return dict(zip(COUNT_KEYS, totals))

    def reset_bad_sample_counts(self) -> None:
        self._counts.zero_()

    def report_bad_samples(self, logger: logging.Logger = log, prefix: str = "") -> Dict[str, int]:
        """Log the counts (warning if any bad input was skipped) and return them; call at the end of an epoch."""
        counts = self.bad_sample_counts()
        bad = {k: v for k, v in counts.items() if v and k != "zero_area"}
        if bad:
            logger.warning("%sskipped bad samples in %s: %s", prefix, self.root, bad)
        if counts["zero_area"]:
            logger.info("%s%d records with area <= 0 skipped (format rule)", prefix, counts["zero_area"])
        return counts

    def _drop_missing_files(self) -> None:
        missing = self.reader.missing_files(self.names)
        if not missing:
            return
        where = self.reader.where
        if not self.skip_bad_samples:
            shown = ", ".join(p for _, p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(where, f"names {len(missing)} missing file(s): {shown}{more}", "missing_file")
        bad = {n for n, _ in missing}
        for _, path in missing:
            self._handle_bad(DataError(where, f"lists a missing file {path}", "missing_file"))
        self.names = [n for n in self.names if n not in bad]
        if not self.names:
            raise DataError(where, "no image left after dropping missing files", "missing_file")

    # ----------------------------------------------------------------------------------------------- negatives
    def _build_negative_index(self) -> None:
        """Index (description, category) of every expression of the split, grouped by category."""
        self._neg_descriptions: List[str] = []
        self._neg_categories: List[str] = []
        self._neg_by_category: Dict[str, np.ndarray] = {}
        if self.negative_ratio <= 0:
            return

        def ignore(_: DataError) -> None:  # counted when the image itself is loaded
            pass

        def load(name: str) -> List[Annotation]:
            try:
                return self.reader.load_annotations(name, ignore if self.skip_bad_samples else _raise)
            except DataError:
                if not self.skip_bad_samples:
                    raise
                return []

        with ThreadPoolExecutor(8) as pool:
            per_image = list(pool.map(load, self.names))
        groups: Dict[str, List[int]] = {}
        for anns in per_image:
            for ann in anns:
                if ann.category is None or ann.empty:  # unknown meaning: never drawn as a no-target expression
                    continue
                groups.setdefault(ann.category, []).append(len(self._neg_descriptions))
                self._neg_descriptions.append(ann.description)
                self._neg_categories.append(ann.category)
        self._neg_by_category = {c: np.asarray(v, dtype=np.int64) for c, v in sorted(groups.items())}

    def sample_negatives(self, present: set, rng: np.random.Generator) -> List[int]:
        """Indices into the negative index: k ~ Poisson(ratio), drawn without replacement among the expressions
        whose category is absent from the image (hence never from the image itself)."""
        if self.negative_ratio <= 0:
            return []
        k = int(rng.poisson(self.negative_ratio))
        if k == 0:
            return []
        pools = [idx for c, idx in self._neg_by_category.items() if c not in present]
        total = sum(len(p) for p in pools)
        if total == 0:
            return []
        flat = np.concatenate(pools)
        return flat[rng.choice(total, size=min(k, total), replace=False)].tolist()

    # ----------------------------------------------------------------------------------------------- loading
    def _train_rng(self, epoch: int, index: int) -> np.random.Generator:
        # Per sample, not per worker stream: resumable mid-epoch and independent of the worker count.
        return np.random.default_rng([self.seed, epoch, index, 1])

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Optional[ImageSample]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        if not self.training:
            rng = np.random.default_rng([self.seed, index])
            try:
                return self.load(index, rng, epoch)
            except DataError as e:
                self._handle_bad(e)
                return None
        rng = self._train_rng(epoch, index)
        for _ in range(self.max_retries + 1):
            try:
                return self.load(index, rng, epoch)
            except DataError as e:
                self._handle_bad(e)
                index = int(rng.integers(len(self)))  # like the official loader: try another image
        raise RuntimeError(f"{self.root}: {self.max_retries + 1} bad samples in a row, giving up")

    def load(self, index: int, rng: np.random.Generator, epoch: int = 0) -> ImageSample:
        """Read, select, decode and transform one image. Raises :class:`DataError` for an unusable image."""
        name = self.names[index]
        reader = self.reader
        anns = reader.load_annotations(
            name, self._handle_bad, keep_empty=self.keep_empty, on_zero_area=partial(self._count, "zero_area")
        )
        image = reader.open_image(name)
        h, w = image.height, image.width
        valid = []
        for ann in anns:
            err = reader.size_mismatch(name, ann, (h, w))
            if err is not None:
                self._handle_bad(err)
                continue
            valid.append(ann)
        if not valid:
            raise DataError(reader.annotation_path(name), "no usable annotation", "no_annotations")

        selected = valid
        if self.training and self.max_expressions_per_image is not None and len(valid) > self.max_expressions_per_image:
            pick = np.sort(rng.choice(len(valid), size=self.max_expressions_per_image, replace=False))
            selected = [valid[i] for i in pick]
        negatives = self.sample_negatives({a.category for a in valid if not a.empty}, rng)

        positives = [a for a in selected if not a.empty]
        masks = reader.decode_masks(name, positives, (h, w))
        draft = self.resolution if self.jpeg_draft else None
        pixels = reader.decode_image(name, image, draft)
        descriptions = [a.description for a in selected] + [self._neg_descriptions[j] for j in negatives]
        image_t, masks_t, descriptions = self.transform(pixels, masks, descriptions, rng)

        r = image_t.shape[-1]
        if len(positives) == len(selected):  # the common case: no in-image empty record, no scatter needed
            all_masks = masks_t
            if negatives:
                all_masks = torch.cat([masks_t, torch.zeros((len(negatives), r, r), dtype=torch.bool)])
        else:
            all_masks = torch.zeros((len(descriptions), r, r), dtype=torch.bool)
            rows = [i for i, a in enumerate(selected) if not a.empty]
            if rows:
                all_masks[rows] = masks_t
        return ImageSample(
            name=name,
            image=image_t,
            masks=all_masks,
            descriptions=descriptions,
            categories=[a.category for a in selected] + [self._neg_categories[j] for j in negatives],
            annotation_ids=[a.index for a in selected] + [-1 - j for j in range(len(negatives))],
            is_negative=[a.empty for a in selected] + [True] * len(negatives),
            orig_size=(h, w),
            epoch=epoch,
        )

    def read_original(self, index: int) -> Dict[str, object]:
        """Every expression of an image at its original resolution (for scoring or visualisation).

        Returns ``image`` uint8 (H,W,3), ``masks`` bool (k,H,W), ``descriptions``, ``categories``,
        ``annotation_ids``, ``name``. Raises :class:`DataError` for bad input (regardless of skip_bad_samples).
        """
        name = self.names[index]
        anns = self.reader.load_annotations(name, keep_empty=self.keep_empty)
        image = self.reader.open_image(name)
        h, w = image.height, image.width
        for ann in anns:
            err = self.reader.size_mismatch(name, ann, (h, w))
            if err is not None:
                raise err
        masks = np.zeros((len(anns), h, w), dtype=bool)
        nonempty = [i for i, a in enumerate(anns) if not a.empty]
        if nonempty:
            masks[nonempty] = self.reader.decode_masks(name, [anns[i] for i in nonempty], (h, w))
        return {
            "name": name,
            "image": np.asarray(self.reader.decode_image(name, image)),
            "masks": masks,
            "descriptions": [a.description for a in anns],
            "categories": [a.category for a in anns],
            "annotation_ids": [a.index for a in anns],
        }
