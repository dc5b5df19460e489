"""Training on several datasets at once, each drawn with its own weight.

An epoch of a :class:`MixedDataset` has ``epoch_size`` samples (default: the datasets' total size). Dataset ``k``
gets a share proportional to its weight (largest-remainder rounding); within it, samples are taken from
successive random permutations of its images (so a small dataset with a large weight repeats, a large one with
a small weight is sub-sampled), from a generator per (seed, epoch, dataset): the same plan on every rank and
worker, and a run resumed mid-epoch sees the same plan. The train sampler then shuffles the epoch's indices.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

__all__ = ["MixedDataset"]


class MixedDataset(Dataset):
    """Args:
        datasets: name -> dataset (each takes ``(index, epoch)`` keys, like ``ReferringDataset``).
        weights: name -> sampling weight (default 1 each; 0 leaves a dataset out of training).
        epoch_size: samples per epoch (default: the sum of the datasets' lengths).
        seed: base seed of the per-epoch plans.
    """

    def __init__(self, datasets: Mapping[str, Dataset], weights: Optional[Mapping[str, float]] = None,
                 epoch_size: Optional[int] = None, seed: int = 0):
        if not datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        self.names = list(datasets)
        self.datasets = [datasets[n] for n in self.names]
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"MixedDataset weights name unknown datasets {unknown}; the datasets are {self.names}")
        self.weights = np.array([float(weights.get(n, 1.0)) for n in self.names])
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError(f"MixedDataset weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.epoch_size = int(epoch_size) if epoch_size is not None else sum(len(d) for d in self.datasets)
        self.seed = int(seed)
        self.epoch = 0
        self._plan: Tuple[int, List[Tuple[int, int]]] = (-1, [])

    def __len__(self) -> int:
        return self.epoch_size

    @property
    def root(self) -> str:
        return ", ".join(f"{n}={getattr(d, 'root', '?')}" for n, d in zip(self.names, self.datasets))

    def shares(self) -> Dict[str, int]:
        """Samples per dataset in each epoch."""
        exact = self.weights / self.weights.sum() * self.epoch_size
        counts = np.floor(exact).astype(np.int64)
        for k in np.argsort(-(exact - counts), kind="stable")[: self.epoch_size - int(counts.sum())]:
            counts[k] += 1
        return dict(zip(self.names, counts.tolist()))

    def plan(self, epoch: int) -> List[Tuple[int, int]]:
        """(dataset, index) of every sample of ``epoch``, grouped by dataset."""
        if self._plan[0] != epoch:
            out: List[Tuple[int, int]] = []
            for k, (dataset, n) in enumerate(zip(self.datasets, self.shares().values())):
                rng = np.random.default_rng([self.seed, epoch, k, 7])
                rounds = -(-n // len(dataset)) if n else 0
                order = np.concatenate([rng.permutation(len(dataset)) for _ in range(rounds)])[:n] if n else []
                out += [(k, int(j)) for j in order]
            self._plan = (epoch, out)
        return self._plan[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        k, j = self.plan(epoch)[index]
        return self.datasets[k][(j, epoch)]

    def report_bad_samples(self, logger: logging.Logger, prefix: str = "") -> Dict[str, Dict[str, int]]:
        return {n: d.report_bad_samples(logger, prefix=f"{prefix}{n}: ") for n, d in zip(self.names, self.datasets)}

    def reset_bad_sample_counts(self) -> None:
        for d in self.datasets:
            d.reset_bad_sample_counts()
