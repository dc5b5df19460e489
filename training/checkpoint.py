"""Checkpoint I/O for training: atomic saves, automatic resume, RNG states, init from pretrained, preemption.

Our checkpoint file is a dict
    {"model": state_dict, "optimizer": state_dict, "epoch": int, "step": int, "best": dict,
     "rng": [per-rank RNG states], "config": resolved config as a plain dict}
``epoch`` is the epoch in progress and ``step`` the global optimizer step; ``step % iters_per_epoch`` steps of
``epoch`` are done (0 after a finished epoch). ``best.pt`` holds the same without optimizer and RNG states.
"""
from __future__ import annotations

import logging
import os
import random
import signal
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

LOG = logging.getLogger("rsam.train")

RESUME_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load one of our checkpoints on CPU (to avoid a GPU memory spike) as plain data (weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = {"model", "epoch", "step"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise KeyError(f"{path} is not a training checkpoint of this project (missing keys {sorted(missing)})")
    return ckpt


def resume_path(log_dir: str) -> Optional[str]:
    path = os.path.join(log_dir, "checkpoints", RESUME_NAME)
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------- RNG states
def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and (if used) CUDA generator states of this process."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(x):
    # random.setstate wants nested tuples; a round trip through some serialisers yields lists.
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ initialisation
def init_from_pretrained(model: nn.Module, sources: List[Dict[str, Any]]) -> None:
    """Load each pretrained source in order through ``rsam.build.load_checkpoint``.

    ``sources``: list of ``{"path": ..., **options}``; the options are passed to ``load_checkpoint``
    unchanged (e.g. whether to also take SAM 2.1's prompt encoder and mask decoder).
    """
    from rsam.build import load_checkpoint

    for src in sources:
        src = dict(src)
        path = src.pop("path")
        if not os.path.exists(path):
            raise FileNotFoundError(f"trainer.checkpoint.init: pretrained weights not found: {path} "
                                    "(see checkpoints/README.md to download them)")
        LOG.info("initialising from %s %s: %s", path, src or "", load_checkpoint(model, path, **src))


# -------------------------------------------------------------------------------------------- preemption
class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 / SIGUSR2 (SLURM preemption, ``scancel --signal``) into a flag the loop polls.

    The loop saves a checkpoint and then calls :meth:`forward_signal`, which hands the signal to whatever
    handler was installed before (e.g. submitit's requeue handler), so the job is requeued only after the
    state is on disk.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)):
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): no preemption support
                LOG.warning("cannot install a handler for %s outside the main thread", signal.Signals(sig).name)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        LOG.warning("received %s: will save a checkpoint and stop", signal.Signals(signum).name)

    def forward_signal(self) -> None:
        prev = self._previous.get(self.received)
        if callable(prev):
            prev(self.received, None)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
