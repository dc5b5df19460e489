"""DataLoader builders for training (shuffled, resumable) and evaluation (sharded without padding)."""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from rsam import distributed
from rsam.data.samplers import ShardedEvalSampler, TrainSampler, seed_worker

__all__ = ["build_train_loader", "build_eval_loader"]


def build_train_loader(
    dataset: Dataset,
    collate_fn: Callable,
    batch_size: int,
    num_workers: int = 4,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    drop_last: bool = True,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    prefetch_factor: Optional[int] = 2,
) -> DataLoader:
    """Training loader: shuffled distributed sampling (call ``loader.sampler.set_epoch(epoch)`` every epoch),
    persistent workers, pinned memory (when CUDA is available), per-worker seeding."""
    world_size = world_size if world_size is not None else distributed.world_size()
    rank = rank if rank is not None else distributed.rank()
    sampler = TrainSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    if num_workers > 0:
        # The Rust tokenizer's thread pool does not survive fork; the collate runs in the workers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=partial(seed_worker, seed=seed, rank=rank),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def build_eval_loader(
    dataset: Dataset,
    collate_fn: Callable,
    batch_size: int,
    num_workers: int = 4,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = True,
    persistent_workers: bool = False,
) -> DataLoader:
    """Evaluation loader over this rank's shard (``ShardedEvalSampler``, no duplicates, order preserved).
    With ``skip_bad_samples`` a batch whose images were all bad comes out as ``None``."""
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedEvalSampler(dataset, rank, world_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=persistent_workers and num_workers > 0,
    )
