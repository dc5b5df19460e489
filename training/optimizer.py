"""AdamW with parameter groups from name patterns, layer-wise lr decay and progress-driven schedules.

Every trainable parameter gets three numbers:
  * a base learning rate and end factor from the first-level *rule* whose patterns match its name
    (rules must not overlap; one rule without patterns is the default for everything else);
  * an lr multiplier from layer decay, for parameters under ``layer_decay.prefix`` (the Hiera trunk):
    ``value ** (num_blocks + 1 - layer_id)`` with ``layer_id = i + 1`` for ``blocks.i`` and 0 for the patch
    embedding, and 1.0 for names matching ``layer_decay.exempt`` (the position embeddings);
  * a weight decay: 0 for the parameters ``no_weight_decay`` exempts, ``weight_decay`` otherwise. The default
    rule ``biases_and_norms`` exempts biases and every normalisation layer's parameters (``LayerNorm2d``
    included); ``official`` reproduces the official trainer: names containing "bias" and ``torch.nn.LayerNorm``
    parameters only (so ``LayerNorm2d`` weights, embeddings, tokens and position embeddings are decayed).
Parameters sharing all three form one torch param group. Frozen parameters are left out entirely.

``python training/train.py -c CONFIG --num-gpus 0 --print-optim-plan`` prints :func:`optim_plan`.

Schedules are pure functions of the training progress ``p`` in [0, 1] (``p = step / total_steps``), written
into the param groups before every step, so resuming needs only the step counter and no scheduler state.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from rsam.errors import UserError


@dataclass
class GroupRule:
    """lr of the parameters whose names match one of ``patterns`` (fnmatch); ``patterns=None``: the default."""

    name: str
    lr: float
    patterns: Optional[List[str]] = None
    lr_end_factor: float = 0.1  # cosine from lr to lr * lr_end_factor


@dataclass
class LayerDecay:
    value: float = 1.0  # 1.0 disables layer decay
    prefix: str = "image_encoder.trunk"
    exempt: List[str] = field(default_factory=lambda: ["*pos_embed*"])


@dataclass
class OptimConfig:
    param_groups: List[GroupRule] = field(default_factory=list)
    weight_decay: float = 0.1
    weight_decay_end_factor: float = 1.0  # 1.0: constant weight decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    gradient_clip: Optional[float] = 0.1  # max global L2 grad norm; None disables clipping
    layer_decay: LayerDecay = field(default_factory=LayerDecay)
    no_weight_decay: str = "biases_and_norms"  # or "official" (see the module docstring)
    fused: Optional[bool] = None  # None: fused AdamW on CUDA, foreach on CPU


@dataclass(frozen=True)
class GroupSchedule:
    """What one torch param group follows: lr = lr_scale * cosine(lr, lr * lr_end_factor)."""

    name: str
    rule: str
    lr: float
    lr_end: float
    lr_scale: float
    weight_decay: float
    weight_decay_end: float
    param_names: tuple

    def at(self, progress: float) -> tuple:
        """(lr, weight decay) of the group at training progress ``progress`` in [0, 1]."""
        return (self.lr_scale * cosine(self.lr, self.lr_end, progress),
                cosine(self.weight_decay, self.weight_decay_end, progress))


def cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); progress is clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


NO_WEIGHT_DECAY_RULES = ("biases_and_norms", "official")


def is_no_weight_decay(param_name: str, module: nn.Module, rule: str = "biases_and_norms") -> bool:
    """Whether the parameter ``param_name`` of ``module`` is exempt from weight decay under ``rule``."""
    if rule == "official":
        return "bias" in param_name or isinstance(module, nn.LayerNorm)
    if param_name.endswith("bias"):
        return True
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def layer_decay_scales(names: Sequence[str], cfg: LayerDecay) -> Dict[str, float]:
    """lr multiplier for every name in ``names`` (1.0 outside ``cfg.prefix`` or when exempt)."""
    prefix = cfg.prefix.rstrip(".") + "."
    block_re = re.compile(r"blocks\.(\d+)\.")
    in_trunk = [n for n in names if n.startswith(prefix)]
    block_ids = {int(m.group(1)) for n in in_trunk if (m := block_re.match(n[len(prefix):]))}
    num_layers = max(block_ids) + 1 if block_ids else 0
    scales = {n: 1.0 for n in names}
    if cfg.value == 1.0:
        return scales
    for n in in_trunk:
        if any(fnmatch.fnmatchcase(n, pat) for pat in cfg.exempt):
            continue
        m = block_re.match(n[len(prefix):])
        layer_id = int(m.group(1)) + 1 if m else 0  # patch embedding (anything before the blocks)
        scales[n] = cfg.value ** (num_layers + 1 - layer_id)
    return scales


def _match_rule(name: str, rules: Sequence[GroupRule]) -> GroupRule:
    hits = [r for r in rules if r.patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in r.patterns)]
    if len(hits) > 1:
        raise UserError(f"optim.param_groups: parameter '{name}' matches several groups "
                         f"{[r.name for r in hits]}; make their patterns disjoint")
    if hits:
        return hits[0]
    defaults = [r for r in rules if r.patterns is None]
    if not defaults:
        raise UserError(f"optim.param_groups: trainable parameter '{name}' matches no group and there is no "
                         "default group (a group without `patterns`)")
    return defaults[0]


def plan_param_groups(model: nn.Module, cfg: OptimConfig) -> List[GroupSchedule]:
    """Split the trainable parameters of ``model`` into groups; validated to cover each exactly once."""
    if sum(r.patterns is None for r in cfg.param_groups) > 1:
        raise UserError("optim.param_groups: at most one group may omit `patterns` (the default group)")
    if cfg.no_weight_decay not in NO_WEIGHT_DECAY_RULES:
        raise UserError(f"optim.no_weight_decay must be one of {NO_WEIGHT_DECAY_RULES}, got {cfg.no_weight_decay!r}")
    if len({r.name for r in cfg.param_groups}) != len(cfg.param_groups):
        raise UserError(f"optim.param_groups: duplicate group names in {[r.name for r in cfg.param_groups]}")
    owner = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = layer_decay_scales([n for n, _ in trainable], cfg.layer_decay)

    groups: Dict[tuple, List[str]] = {}  # insertion order = model order, deterministic across restarts
    for name, _ in trainable:
        rule = _match_rule(name, cfg.param_groups)
        wd = 0.0 if is_no_weight_decay(name, owner[name], cfg.no_weight_decay) else cfg.weight_decay
        groups.setdefault((rule.name, scales[name], wd), []).append(name)

    rules = {r.name: r for r in cfg.param_groups}
    plan = []
    for (rule_name, scale, wd), names in groups.items():
        rule = rules[rule_name]
        label = rule_name + ("" if scale == 1.0 else f".lr_x{scale:.4g}") + ("" if wd else ".no_wd")
        plan.append(GroupSchedule(name=label, rule=rule_name, lr=rule.lr, lr_end=rule.lr * rule.lr_end_factor,
                                  lr_scale=scale, weight_decay=wd, weight_decay_end=wd * cfg.weight_decay_end_factor,
                                  param_names=tuple(names)))
    _validate(plan, [n for n, _ in trainable])
    return plan


def _validate(plan: Sequence[GroupSchedule], trainable: Sequence[str]) -> None:
    seen: Dict[str, str] = {}
    for g in plan:
        for n in g.param_names:
            if n in seen:
                raise AssertionError(f"parameter '{n}' is in two optimizer groups: {seen[n]} and {g.name}")
            seen[n] = g.name
    missing = set(trainable) - set(seen)
    if missing:
        raise AssertionError(f"trainable parameters in no optimizer group: {sorted(missing)[:5]} ...")


class ScheduledOptimizer:
    """A torch AdamW plus the per-group schedules it follows; ``set_progress`` writes lr and weight decay."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedules: List[GroupSchedule]):
        self.optimizer = optimizer
        self.schedules = schedules

    def set_progress(self, progress: float) -> None:
        for group, s in zip(self.optimizer.param_groups, self.schedules):
            group["lr"], group["weight_decay"] = s.at(progress)

    def lrs(self) -> Dict[str, float]:
        return {s.name: g["lr"] for g, s in zip(self.optimizer.param_groups, self.schedules)}

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        # None instead of zeros: Adam skips parameters without gradient and we save a memset.
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        saved = [g.get("name") for g in state["param_groups"]]
        current = [s.name for s in self.schedules]
        if saved != current:
            raise UserError(f"optimizer state in the checkpoint has groups {saved}, the config builds {current}; "
                             "the trainable parameters or optim.param_groups changed since it was saved")
        self.optimizer.load_state_dict(state)
        self.set_progress(0.0)  # lr/wd come from the schedules, never from the saved groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> ScheduledOptimizer:
    """AdamW over the planned groups; schedules set to progress 0."""
    plan = plan_param_groups(model, cfg)
    params = dict(model.named_parameters())
    groups = [{"name": s.name, "params": [params[n] for n in s.param_names]} for s in plan]
    fused = (device.type == "cuda") if cfg.fused is None else cfg.fused
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0,
                                  fused=fused or None, foreach=None if fused else True)
    opt = ScheduledOptimizer(optimizer, plan)
    opt.set_progress(0.0)
    return opt


def optim_plan(model: nn.Module, cfg: OptimConfig, where: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """lr and weight decay of every trainable parameter at each training progress in ``where``.

    ``{"where": [...], "params": {name: {"lr": [...], "wd": [...]}}}`` in model order; nothing is allocated
    beyond the plan (works on a model built on the meta device).
    """
    plan = plan_param_groups(model, cfg)
    params: Dict[str, dict] = {}
    for s in plan:
        lrs, wds = zip(*(s.at(p) for p in where))
        for name in s.param_names:
            params[name] = {"lr": list(lrs), "wd": list(wds)}
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"where": [float(p) for p in where], "params": {n: params[n] for n in order}}
