"""What reading a weights source gives: a :class:`Checkpoint`, its :data:`KINDS`, and :class:`CheckpointError`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from rsam.errors import UserError

__all__ = ["Checkpoint", "CheckpointError", "KINDS", "StateDict"]

StateDict = dict[str, torch.Tensor]


class CheckpointError(UserError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys, unknown layout)."""


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found.

    source: the weights file (or directory); kind: what it is, one of :data:`KINDS`; state_dict: flat
    ``{name: tensor}``; config: the config stored with the weights (a training checkpoint's resolved config, a
    pretrained directory's model + tokenizer nodes), checked as data (:mod:`.stored_config`), else None; extra:
    the other top-level entries of a training checkpoint (``optimizer``, ``epoch``, ``step``, ``rng``, ...) or of
    a pretrained directory (``config_file``, ``info``); bert_config: the ``config.json`` of an HF BERT directory.
    """

    source: str
    state_dict: StateDict
    config: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    bert_config: Optional[dict] = None
    kind: str = ""


# What a weights source is (Checkpoint.kind).
KINDS = {
    "training": "an RSAM training checkpoint (weights + the config it was trained with)",
    "official": "an RSAM state dict without a config (the official release, or a bare state dict)",
    "sam2": "a SAM 2.1 checkpoint (image encoder, optionally the prompt encoder and mask decoder)",
    "bert": "BERT weights (an HF directory or a raw .bin / .safetensors)",
    "pretrained": "an RSAM pretrained directory (config.json + model.safetensors + vocab.txt), local or from the Hub",
}
