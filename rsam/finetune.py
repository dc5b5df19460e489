"""Parameter-efficient fine-tuning: freeze presets and LoRA adapters (through ``peft``), and merging them.

The recipe's ``finetune:`` section maps 1:1 to :class:`FinetuneConfig`::

    finetune:
      freeze: fusion_decoder         # a preset of FREEZE_PRESETS, or a list of parameter-name globs to freeze
      lora: {rank: 8, alpha: 16, dropout: 0.0, targets: [trunk]}   # null: no adapters

Order matters and is fixed by :func:`apply_finetune`: the base weights are loaded first (their key names are
those of the plain model), then the freeze preset, then LoRA adapters (``peft.inject_adapter_in_model``) on the
target linears, whose base weights stay frozen. A run with adapters saves only what it trained
(:func:`trained_state_dict`); loading such a checkpoint means: build, load the base weights, apply the same
``finetune`` section, load the trained tensors (:func:`load_trained_state_dict`), and optionally
:func:`merge_lora` for inference at the plain model's speed.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from rsam.errors import UserError

__all__ = ["FREEZE_PRESETS", "LORA_TARGETS", "LoraSpec", "FinetuneConfig", "apply_finetune", "freeze_parameters",
           "add_lora", "merge_lora", "trained_state_dict", "load_trained_state_dict", "finetune_config"]

# Parameter-name globs each preset freezes (the text encoder of the paper recipe is frozen by the model itself).
FREEZE_PRESETS: Dict[str, List[str]] = {
    "none": [],
    "trunk": ["image_encoder.trunk.*"],                      # train everything but the Hiera trunk
    "image_encoder": ["image_encoder.*"],                    # ... but the whole image encoder (trunk + FPN)
    "fusion_decoder": ["image_encoder.*", "text_encoder.*"],  # train the fusion, text projection and decoder only
}

# Module-name regexes (peft's ``target_modules`` as a string is a full match) of each LoRA target group.
LORA_TARGETS: Dict[str, str] = {
    "trunk": r"image_encoder\.trunk\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.layers\.\d+)",
    "fusion": r"description_transformer\.layers\.\d+\.(\w+\.(q_proj|k_proj|v_proj|out_proj)|mlp\.layers\.\d+)",
    "decoder": r"sam_mask_decoder\.transformer\.layers\.\d+\.(\w+\.(q_proj|k_proj|v_proj|out_proj)|mlp\.layers\.\d+)",
}


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["trunk"])  # names of LORA_TARGETS


@dataclass
class FinetuneConfig:
    freeze: Any = "none"  # a FREEZE_PRESETS name or a list of globs
    lora: Optional[LoraSpec] = None

    @property
    def trained_only(self) -> bool:
        """Checkpoints hold only the trained tensors (runs with adapters): loading needs the base weights."""
        return self.lora is not None


def finetune_config(node: Union[None, Mapping, FinetuneConfig]) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from the config's ``finetune`` node (plain dict or None), validated."""
    if isinstance(node, FinetuneConfig):
        return node
    node = dict(node or {})
    unknown = set(node) - {"freeze", "lora"}
    if unknown:
        raise UserError(f"config section 'finetune': unknown keys {sorted(unknown)} (expected freeze, lora)")
    lora = node.get("lora")
    if lora is not None:
        lora = dict(lora)
        bad = set(lora) - {"rank", "alpha", "dropout", "targets"}
        if bad:
            raise UserError(f"config section 'finetune.lora': unknown keys {sorted(bad)}")
        lora = LoraSpec(**lora)
        unknown_targets = [t for t in lora.targets if t not in LORA_TARGETS]
        if unknown_targets or not lora.targets:
            raise UserError(f"finetune.lora.targets: {lora.targets} must be some of {list(LORA_TARGETS)}")
        if lora.rank < 1:
            raise UserError(f"finetune.lora.rank must be >= 1, got {lora.rank}")
    freeze = node.get("freeze", "none")
    if freeze is None:
        freeze = "none"
    if isinstance(freeze, str) and freeze not in FREEZE_PRESETS:
        raise UserError(f"finetune.freeze: unknown preset {freeze!r}; presets: {list(FREEZE_PRESETS)} "
                         "(or give a list of parameter-name globs)")
    return FinetuneConfig(freeze=freeze if isinstance(freeze, str) else [str(p) for p in freeze], lora=lora)


def freeze_parameters(model: nn.Module, freeze: Union[str, List[str]]) -> List[str]:
    """Set ``requires_grad=False`` on the parameters matching the preset / globs; returns their names."""
    patterns = FREEZE_PRESETS[freeze] if isinstance(freeze, str) else list(freeze)
    frozen = []
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise UserError(f"finetune.freeze: {patterns} match no parameter of the model")
    return frozen


def add_lora(model: nn.Module, cfg: LoraSpec) -> nn.Module:
    """Inject peft LoRA adapters into the target linears; every other parameter keeps its ``requires_grad``.

    The adapted linears' own weights are frozen; ``lora_B`` starts at zero, so the model's outputs are unchanged
    until it trains.
    """
    import peft

    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    regex = "|".join(f"(?:{LORA_TARGETS[t]})" for t in cfg.targets)
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=regex,
                               bias="none")
    model = peft.inject_adapter_in_model(peft_cfg, model)
    # peft marks only the adapters trainable; put back what the recipe trains (e.g. the decoder). Names of
    # untouched modules did not change; those of adapted linears moved under ".base_layer." and stay frozen.
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif ".base_layer." not in name:
            p.requires_grad_(trainable[name])
    return model


def apply_finetune(model: nn.Module, cfg: Union[None, Mapping, FinetuneConfig]) -> nn.Module:
    """Freeze preset, then LoRA adapters, on a model whose base weights are already loaded."""
    cfg = finetune_config(cfg)
    freeze_parameters(model, cfg.freeze)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its linear (peft's merge) and put the plain linear back: the state-dict
    keys become the plain model's again and inference runs at its speed."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]
    for name, mod in layers:
        mod.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.get_base_layer())
    return model


def trained_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors a fine-tuning run changed: the parameters with ``requires_grad`` (adapters included)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def load_trained_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a :func:`trained_state_dict` onto a model prepared the same way (base weights + finetune applied).

    Every trainable parameter of the model must be in ``state`` and every tensor in ``state`` must exist.
    """
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if unexpected or missing:
        raise UserError(f"{source}: the trained tensors do not fit the model of its finetune config: "
                       f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                       f"(e.g. {unexpected[:3]})")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"{source}: shape mismatch for {bad[:3]} (e.g. {bad[0]}: checkpoint "
                         f"{tuple(state[bad[0]].shape)}, model {tuple(own[bad[0]].shape)})")
    model.load_state_dict(dict(state), strict=False)
