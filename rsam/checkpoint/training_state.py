"""Saving and restoring the whole state of a training run, atomically.

A training checkpoint is one file holding plain data only (tensors, numbers, strings, lists, dicts)::

    {"model": state_dict, "optimizer": state_dict, "epoch": int, "step": int, "iteration": int,
     "best": dict, "rng": [per-rank RNG states], "config": resolved config as a plain dict}

``epoch`` is the epoch in progress, ``step`` the global optimizer step (the lr / weight-decay schedules are a
function of it, so there is no scheduler state), ``iteration`` the batches already done in ``epoch`` (the sampler
skips them when resuming). ``best.pt`` holds the same without optimizer and RNG states. A float16 run adds
``"grad_scaler"`` (the GradScaler state). A run with LoRA adapters (``trained_only``) writes only the tensors it
trains in ``"model"`` and ``"trained_only": True``: loading it needs the base weights its config names
(:func:`rsam.build.build_from_checkpoint` does that).

:class:`Checkpointer` is the only writer; every reader goes through :func:`rsam.checkpoint.read_checkpoint`.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from rsam import distributed
from rsam.checkpoint.weights import CheckpointError, load_weights, read_checkpoint
from rsam.finetune import load_trained_state_dict, trained_state_dict

__all__ = ["Checkpointer", "TrainingProgress", "get_rng_state", "set_rng_state", "seed_everything",
           "RESUME_NAME", "BEST_NAME"]

log = logging.getLogger(__name__)

RESUME_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


@dataclass
class TrainingProgress:
    """Where a run stands: the counters a checkpoint restores."""

    epoch: int = 0  # epoch in progress
    step: int = 0  # optimizer steps done (the schedules' position)
    iteration: int = 0  # steps done in ``epoch`` (the sampler's position)
    best: Dict[str, Any] = field(default_factory=dict)  # best validation result so far


# ---------------------------------------------------------------------------------------------- RNG states
def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and (if in use) CUDA generator states of this process, as plain data."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(x):
    # random.setstate wants nested tuples; the weights-only unpickler gives them back as tuples or lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_atomically(path: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a crash mid-write leaves the previous file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """The checkpoints of one experiment: ``<directory>/checkpoint.pt`` (resume), ``best.pt``, ``checkpoint_<e>.pt``.

    Args:
        directory: the experiment's ``checkpoints/`` folder.
        save_every: also keep ``checkpoint_<epoch>.pt`` every k epochs (0: never).
    Every method that writes is a collective: all ranks call it, rank 0 writes, all wait for the file.
    """

    def __init__(self, directory: str, save_every: int = 0, trained_only: bool = False):
        self.directory = directory
        self.save_every = int(save_every)
        self.trained_only = bool(trained_only)  # write only the parameters with requires_grad (LoRA runs)

    def _model_state(self, model: nn.Module) -> Dict[str, Any]:
        if self.trained_only:
            return {"model": trained_state_dict(model), "trained_only": True}
        return {"model": model.state_dict()}

    def load_model_state(self, model: nn.Module, path: str) -> Any:
        ckpt = read_checkpoint(path)
        if bool(ckpt.extra.get("trained_only")) != self.trained_only:
            raise CheckpointError(f"{path}: written {'with' if ckpt.extra.get('trained_only') else 'without'} "
                                  "LoRA adapters (trained_only), but this run's finetune config says otherwise")
        if self.trained_only:
            load_trained_state_dict(model, ckpt.state_dict, path)
        else:
            model.load_state_dict(ckpt.state_dict)
        return ckpt

    @property
    def resume_file(self) -> str:
        return os.path.join(self.directory, RESUME_NAME)

    @property
    def best_file(self) -> str:
        return os.path.join(self.directory, BEST_NAME)

    def has_resume(self) -> bool:
        return os.path.isfile(self.resume_file)

    # ------------------------------------------------------------------------------------------ writing
    def save(self, model: nn.Module, optimizer, progress: TrainingProgress, config: Mapping,
             grad_scaler=None) -> None:
        """Write the resume checkpoint; every rank contributes its RNG states."""
        rng = distributed.all_gather_object(get_rng_state())
        if distributed.rank() == 0:
            extra = {"grad_scaler": grad_scaler.state_dict()} if grad_scaler is not None else {}
            save_atomically(self.resume_file, {
                **self._model_state(model), "optimizer": optimizer.state_dict(), "epoch": progress.epoch,
                "step": progress.step, "iteration": progress.iteration, "best": progress.best, "rng": rng,
                "config": dict(config), **extra})
            if self.save_every and progress.step > 0 and progress.iteration == 0 \
                    and progress.epoch % self.save_every == 0:
                shutil.copyfile(self.resume_file, os.path.join(self.directory, f"checkpoint_{progress.epoch}.pt"))
        distributed.barrier()

    def save_best(self, model: nn.Module, progress: TrainingProgress, config: Mapping) -> None:
        """Write ``best.pt``: the weights and counters of the best validation so far."""
        if distributed.rank() == 0:
            save_atomically(self.best_file, {**self._model_state(model), "epoch": progress.epoch,
                                             "step": progress.step, "iteration": progress.iteration,
                                             "best": progress.best, "config": dict(config)})
        distributed.barrier()

    def adopt(self, path: str) -> None:
        """Copy ``path`` to the resume checkpoint unless this experiment already has one (``resume_from``)."""
        if distributed.rank() == 0 and not self.has_resume():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"trainer.checkpoint.resume_from: {path} does not exist")
            os.makedirs(self.directory, exist_ok=True)
            shutil.copyfile(path, self.resume_file)
        distributed.barrier()

    # ------------------------------------------------------------------------------------------ reading
    def restore(self, model: nn.Module, optimizer=None, grad_scaler=None) -> Optional[TrainingProgress]:
        """Load the resume checkpoint into ``model`` (and ``optimizer``, ``grad_scaler``), restore this rank's
        RNG states.

        Returns the progress to continue from, or None when there is nothing to resume.
        """
        if not self.has_resume():
            return None
        ckpt = self.load_model_state(model, self.resume_file)
        progress = training_progress(ckpt.extra, self.resume_file)
        if optimizer is not None:
            if "optimizer" not in ckpt.extra:
                raise CheckpointError(f"{self.resume_file}: has no optimizer state to resume training from")
            optimizer.load_state_dict(ckpt.extra["optimizer"])
        if grad_scaler is not None and "grad_scaler" in ckpt.extra:
            grad_scaler.load_state_dict(ckpt.extra["grad_scaler"])
        rng: List[dict] = list(ckpt.extra.get("rng") or [])
        world = distributed.world_size()
        if len(rng) == world:
            set_rng_state(rng[distributed.rank()])
        else:
            log.warning("%s has RNG states for %d ranks, this run has %d: the RNG streams are re-seeded",
                        self.resume_file, len(rng), world)
        log.info("resumed from %s: epoch %d, step %d", self.resume_file, progress.epoch, progress.step)
        return progress

    def load_best(self, model: nn.Module) -> bool:
        """Load ``best.pt`` into ``model``; False when there is none (no validation ran)."""
        if not os.path.isfile(self.best_file):
            return False
        self.load_model_state(model, self.best_file)
        return True


def training_progress(extra: Mapping[str, Any], source: str) -> TrainingProgress:
    """The counters of a training checkpoint's top-level entries (``iteration`` defaults to 0)."""
    missing = [k for k in ("epoch", "step") if k not in extra]
    if missing:
        raise CheckpointError(f"{source} is not a training checkpoint of this project (no {missing})")
    return TrainingProgress(epoch=int(extra["epoch"]), step=int(extra["step"]),
                            iteration=int(extra.get("iteration", 0)), best=dict(extra.get("best") or {}))


def initialise_from_pretrained(model: nn.Module, sources: List[Mapping[str, Any]]) -> None:
    """Load each pretrained source (``{"path": ..., **load_weights options}``) in order."""
    for src in sources:
        src = dict(src)
        path = src.pop("path")
        if not os.path.exists(path):
            raise FileNotFoundError(f"trainer.checkpoint.init: pretrained weights not found: {path} "
                                    "(see checkpoints/README.md to download them)")
        log.info("initialising from %s %s: %s", path, src or "", load_weights(model, path, **src))
