"""Samplers: shuffled, resumable training order and padding-free evaluation shards."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from rsam import distributed

__all__ = ["TrainSampler", "ShardedEvalSampler", "seed_worker"]


class TrainSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle, ``set_epoch``) that yields ``(index, epoch)``.

    Carrying the epoch with the index lets persistent dataloader workers seed their per-epoch generator without
    the dataset object (a copy per worker) being told about the new epoch.
    """

    start = 0  # samples of this rank's epoch order to skip (resuming mid-epoch); see set_start

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of the epoch's order (a run resumed after ``start / batch_size`` steps)."""
        self.start = int(start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        for index in list(super().__iter__())[self.start:]:
            yield (index, epoch)

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)


class ShardedEvalSampler(Sampler[int]):
    """Evaluation sharding ``rank::world_size`` without padding: every image is evaluated exactly once across
    ranks (``DistributedSampler`` repeats images to even out the shards, which biases synced metrics)."""

    def __init__(self, data_source: Union[Sequence, int], rank: Optional[int] = None, world_size: Optional[int] = None):
        self.num_items = data_source if isinstance(data_source, int) else len(data_source)
        self.world_size = world_size if world_size is not None else distributed.world_size()
        self.rank = rank if rank is not None else distributed.rank()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.world_size))


def seed_worker(worker_id: int, seed: int = 0, rank: int = 0) -> None:
    """``worker_init_fn``: seed the global ``random`` / ``numpy`` / ``torch`` RNGs per (seed, rank, worker) so that
    any third-party code relying on them differs across workers (the dataset itself uses its own generators)."""
    import random

    ss = np.random.SeedSequence([seed, rank, worker_id])
    s32, s64 = ss.generate_state(2, dtype=np.uint32), ss.generate_state(1, dtype=np.uint64)
    random.seed(int(s32[0]))
    np.random.seed(int(s32[1]))
    torch.manual_seed(int(s64[0]) & ((1 << 63) - 1))
