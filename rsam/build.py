"""Build an RSAM model from its Hydra ``model:`` node and fill it from checkpoints.

    model = build_rsam("configs/rsam_b+_b.yaml", checkpoint="runs/exp/checkpoints/checkpoint.pt")
    model = build_rsam(cfg.model, checkpoint=["sam2.1_hiera_base_plus.pt", "bert-base-uncased/"])

The loading rules (our checkpoints, official RSAM, SAM 2.1, BERT) live in :mod:`rsam.checkpoint`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from rsam.config import compose_config
from rsam.checkpoint import (
    CheckpointError,
    LoadReport,
    ParameterReport,
    load_checkpoint,
    parameter_report,
)

__all__ = ["build_rsam", "load_checkpoint", "model_config", "parameter_report", "CheckpointError",
           "LoadReport", "ParameterReport"]

log = logging.getLogger(__name__)

CheckpointArg = Union[None, str, os.PathLike, Mapping, Sequence[Union[str, os.PathLike, Mapping]]]


def model_config(cfg_model: Any):
    """Return the ``model`` node as an OmegaConf ``DictConfig``.

    Accepts the node itself (``_target_`` at the top), a full config with a ``model:`` entry (so that
    interpolations such as ``${scratch.resolution}`` resolve against it), as a ``DictConfig``, a plain dict
    or the path of a YAML file.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg_model, (str, os.PathLike)):
        path = Path(cfg_model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        # composed, not just loaded: configs such as rsam_b+_b_official.yaml build on another via `defaults:`
        cfg = compose_config(path)
        where = str(path)
    elif isinstance(cfg_model, DictConfig):
        cfg, where = cfg_model, "config"
    elif isinstance(cfg_model, Mapping):
        cfg, where = OmegaConf.create(dict(cfg_model)), "config"
    else:
        raise TypeError(f"build_rsam: expected a DictConfig, a dict or a YAML path, got {type(cfg_model).__name__}")
    if "_target_" not in cfg:
        if "model" not in cfg:
            raise KeyError(f"{where}: no `model:` node and no `_target_` at the top level")
        cfg = cfg.model
    if "_target_" not in cfg:
        raise KeyError(f"{where}: the model node has no `_target_`")
    return cfg


def build_rsam(
    cfg_model: Any,
    checkpoint: CheckpointArg = None,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    mode: str = "eval",
    take_sam_heads: bool = False,
) -> nn.Module:
    """Instantiate the model node (``_target_: rsam.modeling.rsam.RSAM``) and load checkpoints.

    Args:
        cfg_model: see :func:`model_config`.
        checkpoint: a path / state dict, or a list of them loaded in order (e.g. SAM 2.1 then BERT).
        device: where the model ends up.
        strict: passed to :func:`rsam.checkpoint.load_checkpoint` (missing keys in scope are errors).
        mode: ``"eval"`` (default, for inference) or ``"train"``.
        take_sam_heads: for SAM 2.1 files, also take the prompt encoder and mask decoder.
    """
    from hydra.utils import instantiate

    if mode not in ("eval", "train"):
        raise ValueError(f"build_rsam: mode must be 'eval' or 'train', got {mode!r}")
    node = model_config(cfg_model)
    model = instantiate(node, _convert_="all")
    if checkpoint is not None:
        sources = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        for source in sources:
            report = load_checkpoint(model, source, strict=strict, take_sam_heads=take_sam_heads)
            log.info("%s", report)
    model = model.to(device)
    return model.train(mode == "train")
