"""The process group: joining it, and the few collectives the library and the trainer use.

Ranks come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
which is what torchrun, SLURM (through the launcher) and the local spawn launchers provide. One process
(no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) runs without a process group, and every helper below then degenerates
to the identity, so callers use them unconditionally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "destroy_distributed", "is_distributed", "rank", "world_size",
           "barrier", "all_reduce", "all_gather_object", "any_rank"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(accelerator: str, timeout_min: int = 30) -> DistInfo:
    """Join the process group the environment describes and pick this process's device.

    ``accelerator``: ``"cuda"`` (one GPU per process, NCCL) or ``"cpu"`` (gloo).
    """
    if accelerator not in ("cuda", "cpu"):
        raise ValueError(f"accelerator must be 'cuda' or 'cpu', got {accelerator!r}")
    rank_ = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank_))
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("accelerator cuda, but no CUDA device is visible; use --num-gpus 0 "
                               "(trainer.accelerator=cpu) to run on the CPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set in the environment")
        dist.init_process_group(backend="nccl" if accelerator == "cuda" else "gloo", rank=rank_, world_size=world,
                                timeout=timedelta(minutes=timeout_min),
                                device_id=device if accelerator == "cuda" else None)
    return DistInfo(rank=rank_, local_rank=local_rank, world_size=world, device=device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed(group=None) -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` with ``op`` in {"sum", "max"}; returns it."""
    if is_distributed(group):
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return tensor


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """One picklable object per rank, in rank order (``[obj]`` without a process group)."""
    if not is_distributed(group):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def any_rank(flag: bool, group=None, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is True on at least one (a collective)."""
    if not is_distributed(group):
        return bool(flag)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
