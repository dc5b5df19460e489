"""Checksums of training checkpoints: a damaged file is noticed before anything is trained on from it.

:class:`rsam.checkpoint.Checkpointer` stores ``"sha256"``: the digest of everything else the file holds (names,
scalar values, and each tensor's dtype, shape and bytes). :func:`verify` recomputes it over what
:func:`rsam.checkpoint.read_checkpoint` read back, so the bytes are read once, by the one reader.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import torch

from rsam.checkpoint.checkpoint import Checkpoint, CheckpointError

__all__ = ["CHECKSUM_KEY", "DamagedCheckpointError", "state_digest", "with_checksum", "verify"]

CHECKSUM_KEY = "sha256"


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose content no longer matches the checksum written with it (or that cannot be read)."""


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content, the checksum entry itself left out.

    Lists and tuples hash alike and mapping keys in sorted order: the weights-only unpickler and the stored-config
    check (rsam/checkpoint/stored_config.py) may give a tuple back as a list.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        keys = sorted(obj, key=lambda k: (type(k).__name__, repr(k)))
        h.update(f"D{len(keys)}".encode())
        for key in keys:
            text = repr(key)
            h.update(f"K{len(text)}:{text}".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        text = f"{type(obj).__name__}:{obj!r}"
        h.update(f"V{len(text)}:{text}".encode())


def with_checksum(state: Mapping[str, Any]) -> dict:
    """``state`` on the CPU (one copy, which ``torch.save`` would make anyway) with its checksum added."""
    cpu = _to_cpu(dict(state))
    cpu[CHECKSUM_KEY] = state_digest(cpu)
    return cpu


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def verify(ckpt: Checkpoint) -> Optional[bool]:
    """Check a training checkpoint against its stored checksum: True when it matches, None when it has none
    (written before checksums were stored); raises :class:`DamagedCheckpointError` on a mismatch."""
    stored = ckpt.extra.get(CHECKSUM_KEY)
    if stored is None:
        return None
    content = {"model": ckpt.state_dict, **ckpt.extra}
    if ckpt.config is not None:
        content["config"] = ckpt.config
    if state_digest(content) != stored:
        raise DamagedCheckpointError(f"{ckpt.source} is damaged: its content does not match the checksum "
                                     "written with it")
    return True
