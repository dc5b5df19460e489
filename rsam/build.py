"""Build an RSAM model: from its Hydra ``model:`` node, or as the checkpoint it was trained as.

    model = build_rsam("configs/rsam_b+_b.yaml")                                   # random weights
    model = build_rsam(cfg.model, checkpoint=["sam2.1_hiera_base_plus.pt", "bert-base-uncased/"])
    model, cfg = build_from_checkpoint("rsam_logs/exp/checkpoints/best.pt")        # our checkpoint: its own config
    model, cfg = build_from_checkpoint("rsam_official.pt", config="configs/rsam_b+_b_official.yaml")

The weight formats and their key mapping live in :mod:`rsam.checkpoint`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from rsam.checkpoint import Checkpoint, CheckpointError, StoredConfigError, build_stored, load_weights, read_checkpoint
from rsam.checkpoint.stored_config import MODEL_TARGETS
from rsam.config import compose_config, instantiate
from rsam.errors import UserError

__all__ = ["build_rsam", "build_from_checkpoint", "model_config", "config_differences", "ConfigMismatchError",
           "parameter_report", "ParameterReport"]

log = logging.getLogger(__name__)

WeightsArg = Union[None, str, os.PathLike, Mapping, Checkpoint, Sequence[Union[str, os.PathLike, Mapping]]]


class ConfigMismatchError(UserError):
    """A checkpoint's weights do not fit the model of the given config; the message names the keys."""


def _as_config(config: Any, overrides: Sequence[str] = ()):
    """A DictConfig from a YAML path (composed with ``overrides``), a dict or a DictConfig."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        # composed, not just loaded: configs such as rsam_b+_b_official.yaml build on another via `defaults:`
        return compose_config(path, overrides)
    if overrides:
        raise UserError("config overrides need a YAML config path")
    if isinstance(config, DictConfig):
        return config
    if isinstance(config, Mapping):
        return OmegaConf.create(dict(config))
    raise TypeError(f"expected a DictConfig, a dict or a YAML path, got {type(config).__name__}")


def model_config(cfg_model: Any):
    """Return the ``model`` node as an OmegaConf ``DictConfig``.

    Accepts the node itself (``_target_`` at the top), a full config with a ``model:`` entry (so that
    interpolations such as ``${scratch.resolution}`` resolve against it), as a ``DictConfig``, a plain dict
    or the path of a YAML file.
    """
    cfg = _as_config(cfg_model)
    where = str(cfg_model) if isinstance(cfg_model, (str, os.PathLike)) else "config"
    if "_target_" not in cfg:
        if "model" not in cfg:
            raise UserError(f"{where}: no `model:` node and no `_target_` at the top level")
        cfg = cfg.model
    if "_target_" not in cfg:
        raise UserError(f"{where}: the model node has no `_target_`")
    return cfg


def build_rsam(
    cfg_model: Any,
    checkpoint: WeightsArg = None,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    mode: str = "eval",
    take_sam_heads: bool = False,
) -> nn.Module:
    """Instantiate the model node (``_target_: rsam.modeling.rsam.RSAM``) and load weights.

    Args:
        cfg_model: see :func:`model_config`.
        checkpoint: anything :func:`rsam.checkpoint.load_weights` reads, or a list of them loaded in order
            (e.g. SAM 2.1 then BERT). None: random initialisation, no file is touched.
        device: where the model ends up.
        strict: missing keys in the format's scope are errors (see :func:`rsam.checkpoint.load_weights`).
        mode: ``"eval"`` (default, for inference) or ``"train"``.
        take_sam_heads: for SAM 2.1 files, also take the prompt encoder and mask decoder.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"build_rsam: mode must be 'eval' or 'train', got {mode!r}")
    model = instantiate(model_config(cfg_model), "the config's model node")
    return _with_weights(model, checkpoint, device, strict, mode, take_sam_heads)


def _build_stored_model(ckpt: Checkpoint) -> nn.Module:
    """The model node stored with ``ckpt``, built as data (:func:`rsam.checkpoint.build_stored`): only RSAM's
    own model parts, never through Hydra."""
    if ckpt.kind == "pretrained":
        where, key = ckpt.extra.get("config_file", ckpt.source), "model"
    else:
        where, key = ckpt.source, "config.model"
    node = ckpt.config["model"]
    if node.get("_target_") != "rsam.modeling.rsam.RSAM":
        raise StoredConfigError(f"{where}: key '{key}._target_': {node.get('_target_')!r} is not "
                                "rsam.modeling.rsam.RSAM")
    return build_stored(node, where, key, allowed=MODEL_TARGETS)


def _with_weights(model: nn.Module, checkpoint: WeightsArg, device, strict: bool, mode: str,
                  take_sam_heads: bool) -> nn.Module:
    if checkpoint is not None:
        for source in checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]:
            log.info("%s", load_weights(model, source, strict=strict, take_sam_heads=take_sam_heads))
    return model.to(device).train(mode == "train")


def _flatten(node: Any, prefix: str = "") -> dict:
    if isinstance(node, Mapping):
        out: dict = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, (list, tuple)):
        return {prefix: [_flatten(v) if isinstance(v, Mapping) else v for v in node]}
    return {prefix: node}


def config_differences(a: Mapping, b: Mapping, prefix: str = "model") -> List[Tuple[str, Any, Any]]:
    """``(key, a value, b value)`` for every leaf that differs between two (plain, resolved) config trees."""
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    missing = object()
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float)) and float(va) == float(vb)):
            diffs.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
    return diffs


def _plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_from_checkpoint(
    checkpoint: Union[str, os.PathLike, Checkpoint],
    config: Any = None,
    device: Union[None, str, torch.device] = None,
    overrides: Sequence[str] = (),
    base: Optional[Sequence[Union[str, Mapping]]] = None,
    merge_adapters: bool = True,
    revision: Optional[str] = None,
) -> Tuple[nn.Module, dict]:
    """Build the model a checkpoint was trained as and load its weights -> ``(model in eval mode, config dict)``.

    Args:
        checkpoint: anything :func:`rsam.checkpoint.read_checkpoint` reads: our checkpoint (its stored config is
            used), a pretrained directory or Hub repo id (its config.json is used), or an official / bare RSAM
            state dict (then ``config`` is required); or a :class:`rsam.checkpoint.Checkpoint` already read. A
            stored config is data: the model it describes is built from RSAM's own classes only
            (:mod:`rsam.checkpoint.stored_config`); ``config`` is yours, and goes through Hydra.
        config: YAML path, dict or DictConfig replacing the stored config. Where its ``model`` node differs from
            the stored one, the differing keys are named: in a :class:`ConfigMismatchError` when the weights do
            not fit, in a warning when they do.
        device: default CUDA when available, else CPU.
        overrides: Hydra overrides applied to a YAML ``config`` (e.g. ``["model.image_size=512"]``).
        base: for a checkpoint of a LoRA run (only the trained tensors): the base weights to load first, paths or
            ``{path, **load_weights options}``; default the run's own ``trainer.checkpoint.init``.
        merge_adapters: fold LoRA adapters into their linears (plain model keys and speed; same outputs).
        revision: for a Hub repo id, the branch, tag or commit.
    """
    ckpt = read_checkpoint(checkpoint, revision)
    stored = ckpt.config
    if config is None and stored is None:
        raise UserError(f"{ckpt.source} holds no config (an official or bare state dict): pass a config "
                         "(config=<YAML>, --config) describing the model")
    cfg = _plain(_as_config(config, overrides)) if config is not None else stored
    stored_in = ckpt.extra.get("config_file", ckpt.source)  # a pretrained directory: its config.json
    where = "the config" if config is not None else f"the config stored in {stored_in}"
    if not isinstance(cfg.get("model"), Mapping):
        raise UserError(f"{where} has no `model:` node")
    diffs = config_differences(stored["model"], cfg["model"]) if (config is not None and stored) else []
    listing = "\n  ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if ckpt.extra.get("trained_only"):
        return _build_fine_tuned(ckpt, cfg, config is None, device, base, merge_adapters), cfg
    try:
        if config is None:
            model = _with_weights(_build_stored_model(ckpt), ckpt, device, True, "eval", False)
        else:
            model = build_rsam(model_config(cfg), checkpoint=ckpt, device=device, mode="eval")
    except CheckpointError as exc:
        # the config keys first: they say why, the tensor list that follows says where
        detail = f"; its model node differs from the one stored in the checkpoint at:\n  {listing}\n" \
            if diffs else ":\n"
        raise ConfigMismatchError(f"{ckpt.source} does not fit the model of {where}{detail}{exc}") from None
    if diffs:
        log.warning("%s: the config's model node differs from the one stored in the checkpoint (the weights "
                    "fit):\n  %s", ckpt.source, listing)
    return model, cfg


def _build_fine_tuned(ckpt: Checkpoint, cfg: dict, stored: bool, device: torch.device, base,
                      merge_adapters: bool) -> nn.Module:
    """A LoRA run's checkpoint: base weights, the run's ``finetune`` section, then the trained tensors.
    ``stored``: ``cfg`` is the checkpoint's own config (built as data), not one the caller passed."""
    from rsam.checkpoint import initialise_from_pretrained
    from rsam.finetune import apply_finetune, load_trained_state_dict, merge_lora

    if base is None:
        base = ((cfg.get("trainer") or {}).get("checkpoint") or {}).get("init") or []
        if not base:
            log.warning("%s holds only fine-tuned tensors and its config names no base weights "
                        "(trainer.checkpoint.init): the rest of the model stays randomly initialised", ckpt.source)
    sources = [dict(s) if isinstance(s, Mapping) else {"path": str(s)} for s in base]
    model = _build_stored_model(ckpt) if stored else build_rsam(model_config(cfg))
    initialise_from_pretrained(model, sources)
    # the adapters' structure belongs to the checkpoint: its own finetune section, whatever config was passed
    model = apply_finetune(model, (ckpt.config or {}).get("finetune") or cfg.get("finetune"))
    load_trained_state_dict(model, ckpt.state_dict, str(ckpt.source))
    if merge_adapters:
        model = merge_lora(model)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------------------
# parameter counts


@dataclass
class ParameterReport:
    """Parameter counts per top-level submodule (``rows``: name -> (params, trainable)) and in total."""

    rows: dict[str, tuple[int, int]]
    total: int
    trainable: int
    buffers: int

    def __str__(self) -> str:
        width = max([len(n) for n in self.rows] + [len("total")])
        lines = [f"{'module':<{width}}  {'params':>13}  {'trainable':>13}"]
        lines += [f"{n:<{width}}  {p:>13,}  {t:>13,}" for n, (p, t) in self.rows.items()]
        lines.append(f"{'total':<{width}}  {self.total:>13,}  {self.trainable:>13,}")
        lines.append(f"(+ {self.buffers:,} buffer elements in the state dict)")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count parameters per top-level child (and bare parameters of the root)."""
    rows: dict[str, tuple[int, int]] = {}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        params, trainable = rows.get(top, (0, 0))
        rows[top] = (params + p.numel(), trainable + (p.numel() if p.requires_grad else 0))
    total = sum(p for p, _ in rows.values())
    trainable = sum(t for _, t in rows.values())
    saved = set(model.state_dict())  # persistent buffers only
    buffers = sum(b.numel() for name, b in model.named_buffers() if name in saved)
    return ParameterReport(rows=rows, total=total, trainable=trainable, buffers=buffers)
