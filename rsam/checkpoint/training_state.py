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

Every file the :class:`Checkpointer` writes also holds ``"sha256"``, the checksum of the rest
(:mod:`rsam.checkpoint.integrity`), verified before the file is used. The resume checkpoint keeps its
predecessor as ``checkpoint.prev.pt``: a damaged ``checkpoint.pt`` is reported in one line and training
resumes from the previous one, never from the damaged file.

:class:`Checkpointer` is the only writer; every reader goes through :func:`rsam.checkpoint.read_checkpoint`.
"""
from __future__ import annotations

import contextlib
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
from rsam.atomic_files import atomic_path
from rsam.checkpoint.checkpoint import Checkpoint
from rsam.checkpoint.integrity import DamagedCheckpointError, verify, with_checksum
from rsam.checkpoint.weights import CheckpointError, load_weights, read_checkpoint
from rsam.finetune import load_trained_state_dict, trained_state_dict

__all__ = ["Checkpointer", "TrainingProgress", "get_rng_state", "set_rng_state", "seed_everything",
           "RESUME_NAME", "PREVIOUS_NAME", "BEST_NAME"]

log = logging.getLogger(__name__)

RESUME_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"  # the resume checkpoint before the last one
BEST_NAME = "best.pt"


@dataclass
class TrainingProgress:
    """Where a run stands: the counters a checkpoint restores."""

    epoch: int = 0  # epoch in progress
    step: int = 0  # optimizer steps done (the schedules' position)
    iteration: int = 0  # steps done in ``epoch`` (the sampler's position)
    best: Dict[str, Any] = field(default_factory=dict)  # best validation result so far
    validate_epoch: Optional[int] = None  # a finished epoch whose validation has not run yet (training/trainer.py)


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
    """Write ``state`` and its checksum to ``path`` so that a crash mid-write leaves the previous file intact."""
    state = with_checksum(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
        self._resume_damaged = False  # checkpoint.pt failed its check: never keep it as checkpoint.prev.pt

    def _model_state(self, model: nn.Module) -> Dict[str, Any]:
        if self.trained_only:
            return {"model": trained_state_dict(model), "trained_only": True}
        return {"model": model.state_dict()}

    def load_model_state(self, model: nn.Module, path: str) -> Any:
        return self._load_model_state(model, read_intact(path))

    def _load_model_state(self, model: nn.Module, ckpt: Checkpoint) -> Checkpoint:
        path = ckpt.source
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

    @property
    def previous_file(self) -> str:
        return os.path.join(self.directory, PREVIOUS_NAME)

    def has_resume(self) -> bool:
        """Whether this experiment has a resume checkpoint (the last one or its predecessor)."""
        return os.path.isfile(self.resume_file) or os.path.isfile(self.previous_file)

    # ------------------------------------------------------------------------------------------ writing
    def save(self, model: nn.Module, optimizer, progress: TrainingProgress, config: Mapping,
             grad_scaler=None) -> None:
        """Write the resume checkpoint; every rank contributes its RNG states."""
        rng = distributed.all_gather_object(get_rng_state())
        if distributed.rank() == 0:
            extra = {"grad_scaler": grad_scaler.state_dict()} if grad_scaler is not None else {}
            self._write_resume({
                **self._model_state(model), "optimizer": optimizer.state_dict(), "epoch": progress.epoch,
                "step": progress.step, "iteration": progress.iteration, "best": progress.best,
                "validate_epoch": progress.validate_epoch, "rng": rng, "config": dict(config), **extra})
            if self.save_every and progress.step > 0 and progress.iteration == 0 \
                    and progress.epoch % self.save_every == 0:
                with atomic_path(os.path.join(self.directory, f"checkpoint_{progress.epoch}.pt")) as tmp:
                    shutil.copyfile(self.resume_file, tmp)
        distributed.barrier()

    def _write_resume(self, state: Mapping[str, Any]) -> None:
        """Write checkpoint.pt; the one it replaces becomes checkpoint.prev.pt once the new one is complete.

        The current file is hard-linked to a pending name first (no copy, no space), so that a failed write
        (a full disk) leaves checkpoint.pt and checkpoint.prev.pt as they were.
        """
        pending = os.path.join(self.directory, f".{PREVIOUS_NAME}.pending")
        keep = os.path.isfile(self.resume_file) and not self._resume_damaged
        if keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pending)
            try:
                os.link(self.resume_file, pending)
            except OSError:  # a file system without hard links: copy the current file over the previous one
                with atomic_path(self.previous_file) as tmp:
                    shutil.copyfile(self.resume_file, tmp)
                keep = False
        try:
            save_atomically(self.resume_file, state)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pending)
            raise
        if keep:
            os.replace(pending, self.previous_file)
        self._resume_damaged = False

    def save_best(self, model: nn.Module, progress: TrainingProgress, config: Mapping) -> None:
        """Write ``best.pt``: the weights and counters of the best validation so far."""
        if distributed.rank() == 0:
            save_atomically(self.best_file, {**self._model_state(model), "epoch": progress.epoch,
                                             "step": progress.step, "iteration": progress.iteration,
                                             "best": progress.best, "config": dict(config)})
        distributed.barrier()

    # ------------------------------------------------------------------------------------------ reading
    def restore(self, model: nn.Module, optimizer=None, grad_scaler=None,
                resume_from: Optional[str] = None) -> Optional[TrainingProgress]:
        """Load the resume checkpoint into ``model`` (and ``optimizer``, ``grad_scaler``), restore this rank's
        RNG states.

        Tries checkpoint.pt, then checkpoint.prev.pt; an experiment with neither starts from ``resume_from``
        (``trainer.checkpoint.resume_from``), which is copied to checkpoint.pt only once it has loaded.
        Returns the progress to continue from, or None when there is nothing to resume.
        """
        candidates = [p for p in (self.resume_file, self.previous_file) if os.path.isfile(p)]
        adopting = not candidates and bool(resume_from)
        if adopting:
            if not os.path.isfile(resume_from):
                raise FileNotFoundError(f"trainer.checkpoint.resume_from: {resume_from} does not exist")
            candidates = [resume_from]
        if not candidates:
            return None
        ckpt = self._first_intact(candidates)
        source = ckpt.source
        progress = training_progress(ckpt.extra, source)
        self._load_model_state(model, ckpt)
        if optimizer is not None:
            if "optimizer" not in ckpt.extra:
                raise CheckpointError(f"{source}: has no optimizer state to resume training from")
            optimizer.load_state_dict(ckpt.extra["optimizer"])
        if grad_scaler is not None and "grad_scaler" in ckpt.extra:
            grad_scaler.load_state_dict(ckpt.extra["grad_scaler"])
        rng: List[dict] = list(ckpt.extra.get("rng") or [])
        world = distributed.world_size()
        if len(rng) == world:
            set_rng_state(rng[distributed.rank()])
        else:
            log.warning("%s has RNG states for %d ranks, this run has %d: the RNG streams are re-seeded",
                        source, len(rng), world)
        if adopting and distributed.rank() == 0:  # it loaded: now it becomes this experiment's checkpoint
            with atomic_path(self.resume_file) as tmp:
                shutil.copyfile(resume_from, tmp)
        distributed.barrier()
        log.info("resumed from %s: epoch %d, step %d", source, progress.epoch, progress.step)
        return progress

    def _first_intact(self, paths: List[str]) -> Checkpoint:
        """The first of ``paths`` that reads and matches its checksum; each one skipped is one warning line."""
        problems = []
        for path in paths:
            try:
                ckpt = read_intact(path)
            except DamagedCheckpointError as exc:
                problems.append(str(exc))
                self._resume_damaged |= path == self.resume_file
                log.warning("%s%s", exc, "; trying the previous checkpoint" if path != paths[-1] else "")
                continue
            return ckpt
        advice = (f"; move the damaged files out of {self.directory} to start again"
                  if self.resume_file in paths else "")
        raise DamagedCheckpointError("no intact checkpoint to resume from: " + "; ".join(problems) + advice)

    def load_best(self, model: nn.Module) -> bool:
        """Load ``best.pt`` into ``model``; False when there is none (no validation ran)."""
        if not os.path.isfile(self.best_file):
            return False
        self.load_model_state(model, self.best_file)
        return True


def read_intact(path: str) -> Checkpoint:
    """:func:`read_checkpoint` of a file this module wrote, verified against its checksum.

    A file that does not read, or no longer matches, raises :class:`DamagedCheckpointError`; a file from
    before checksums were stored is read as it is (one log line says so).
    """
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:  # flipped bytes surface as any of read_checkpoint's complaints
        detail = str(exc).removeprefix(f"{path}: ")
        raise DamagedCheckpointError(f"{path} is damaged: {detail}") from None
    if verify(ckpt) is None:
        log.info("%s has no checksum (written before checksums were stored): using it unverified", path)
    return ckpt


def training_progress(extra: Mapping[str, Any], source: str) -> TrainingProgress:
    """The counters of a training checkpoint's top-level entries (``iteration`` defaults to 0)."""
    missing = [k for k in ("epoch", "step") if k not in extra]
    if missing:
        raise CheckpointError(f"{source} is not a training checkpoint of this project (no {missing})")
    pending = extra.get("validate_epoch")
    return TrainingProgress(epoch=int(extra["epoch"]), step=int(extra["step"]),
                            iteration=int(extra.get("iteration", 0)), best=dict(extra.get("best") or {}),
                            validate_epoch=None if pending is None else int(pending))


def read_init_sources(sources: List[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Read each pretrained source of :func:`initialise_from_pretrained` now, before anything is built, so that
    a missing or refused file is reported first; the result loads with :func:`initialise_from_pretrained`
    without reading anything again."""
    read = []
    for src in sources:
        path = src["path"]
        try:
            ckpt = read_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"trainer.checkpoint.init: pretrained weights not found: {path} "
                                    "(see checkpoints/README.md to download them)") from None
        read.append({**src, "checkpoint": ckpt})
    return read


def initialise_from_pretrained(model: nn.Module, sources: List[Mapping[str, Any]]) -> None:
    """Load each pretrained source (``{"path": ..., **load_weights options}``: any weights source that
    :func:`rsam.checkpoint.read_checkpoint` reads, a Hub repo id included) in order."""
    for src in sources:
        src = dict(src)
        path = src.pop("path")
        ckpt = src.pop("checkpoint", None)  # already read (read_init_sources)
        try:
            report = load_weights(model, path if ckpt is None else ckpt, **src)
        except FileNotFoundError:
            raise FileNotFoundError(f"trainer.checkpoint.init: pretrained weights not found: {path} "
                                    "(see checkpoints/README.md to download them)") from None
        log.info("initialising from %s %s: %s", path, src or "", report)
