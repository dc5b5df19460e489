"""Process-group setup and the few collectives the trainer uses.

Ranks come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
which is what torchrun, SLURM (through the launcher) and the local spawn launcher all provide. A single
process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) runs without a process group: every helper below then
degenerates to the identity, so a one-GPU run or a test can call them unconditionally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as dist


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
    """Join the process group described by the environment; pick this process's device.

    ``accelerator`` is ``"cuda"`` (one GPU per process, NCCL) or ``"cpu"`` (gloo).
    """
    if accelerator not in ("cuda", "cpu"):
        raise ValueError(f"trainer.accelerator must be 'cuda' or 'cpu', got {accelerator!r}")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))

    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.accelerator=cuda but no CUDA device is visible; "
                               "use --num-gpus 0 (or trainer.accelerator=cpu) to train on the CPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {key} is not set in the environment")
        backend = "nccl" if accelerator == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_min),
                                device_id=device if accelerator == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``tensor`` with ``op`` in {"sum", "mean", "max"}; returns it."""
    if is_distributed():
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= dist.get_world_size()
        else:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """One picklable object per rank, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
