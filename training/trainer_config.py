"""The ``trainer:`` section of a config: its schema (defaults and meaning of every key) and the validation of any
config section against a dataclass schema."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from rsam.errors import UserError
from rsam.evaluation.metrics import DEFAULT_CONVENTION


@dataclass
class AmpConf:
    enabled: bool = True
    dtype: str = "auto"  # auto: bfloat16 where the GPU has it, else float16 + GradScaler; float32 on CPU


@dataclass
class CheckpointConf:
    # Pretrained weights loaded when there is nothing to resume: list of {path, **load_weights options}.
    init: List[Dict[str, Any]] = field(default_factory=list)
    resume_from: Optional[str] = None  # resumed from, then copied to checkpoints/checkpoint.pt, when that is absent
    save_every: int = 0  # also keep checkpoint_<epoch>.pt every k epochs (0: never)
    eval_weights: Optional[str] = None  # mode val/test: weights to evaluate (ours or official); default best.pt


@dataclass
class TrainerConf:
    mode: str = "train"  # train: train + val each epoch + test with the best; val / test: evaluate only
    accelerator: str = "cuda"
    max_epochs: int = 60
    seed: int = 123
    amp: AmpConf = field(default_factory=AmpConf)
    compile: bool = False  # torch.compile the training forward; batches then have static shapes (data collate)
    grad_accumulation: int = 1  # micro-batches per optimizer step (the step equals one over their union)
    activation_checkpointing: Optional[str] = None  # null | trunk | all (trunk + fusion + decoder transformers)
    log_every: int = 50  # steps between loss/lr logs (and host syncs)
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    metric_convention: str = DEFAULT_CONVENTION  # rsam/evaluation/metrics.py
    best_metric: str = "mIoU"  # on the val split; higher is better
    test_split: Optional[str] = "test"  # evaluated with best.pt at the end of training; null: skip
    num_visuals: int = 4  # validation overlays written to TensorBoard per epoch
    progress_bar: bool = True
    stop_after_steps: Optional[int] = None  # save and stop like a preemption after this global step
    allow_tf32: bool = True
    dist_timeout_min: int = 30
    check_leakage: bool = True  # report training images that also appear (by content) in val / test
    strict_leakage: bool = False  # ... and stop with an error
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)


def parse_section(schema, node, where: str):
    """Validate a config section against a dataclass schema; unknown or mistyped keys name the section."""
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}  # resolve against the root
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except Exception as exc:  # omegaconf raises several types, all with a readable message
        raise UserError(f"config section '{where}': {exc}") from None
    return OmegaConf.to_object(merged)
