"""The README's model-zoo table: parameters, trainable parameters per fine-tuning preset, checkpoint sizes and the
memory estimate of every SAM 2.1 size; prints one JSON object per line (one per size and preset).

    python -m benchmarks.model_zoo                      # all sizes, presets, 800 px, 8 images / 24 expressions
    python -m benchmarks.model_zoo --sizes tiny --no-memory

Built on the meta device (no weights). Checkpoint sizes are the tensor bytes of what the trainer writes:
``best.pt`` holds the model state (with LoRA: only the trained tensors), the resume ``checkpoint.pt`` adds two
fp32 AdamW moments per trainable parameter. Memory: ``benchmarks.estimate_memory`` (method in its docstring)
with activation checkpointing of the trunk, for one micro-batch of the paper's per-GPU size.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

CONFIGS = {"tiny": "configs/rsam_t_b.yaml", "small": "configs/rsam_s_b.yaml", "base_plus": "configs/rsam_b+_b.yaml",
           "large": "configs/rsam_l_b.yaml"}
PRESETS = {  # name -> Hydra overrides of the finetune section
    "full (paper: BERT frozen)": [],
    "freeze trunk": ["finetune.freeze=trunk"],
    "fusion + decoder only": ["finetune.freeze=fusion_decoder"],
    "LoRA r8 trunk+fusion, decoder trained": ["finetune.freeze=trunk",
                                              "finetune.lora={rank:8,alpha:16,targets:[trunk,fusion]}"],
}
MiB = 2 ** 20


def row(size: str, preset: str, memory: bool) -> dict:
    from hydra.utils import instantiate

    from rsam.config import compose_config
    from rsam.finetune import apply_finetune, finetune_config, trained_state_dict

    overrides = PRESETS[preset]
    cfg = compose_config(CONFIGS[size], overrides)
    with torch.device("meta"):
        model = apply_finetune(instantiate(cfg.model, _convert_="all"), cfg.get("finetune"))
    trained_only = finetune_config(cfg.get("finetune")).trained_only
    state = trained_state_dict(model) if trained_only else model.state_dict()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"size": size, "preset": preset, "parameters": sum(p.numel() for p in model.parameters()),
           "trainable_parameters": trainable,
           "best_pt_mib": round(sum(t.numel() * t.element_size() for t in state.values()) / MiB, 1),
           "resume_pt_mib": round((sum(t.numel() * t.element_size() for t in state.values()) + 8 * trainable) / MiB, 1)}
    if memory:
        from benchmarks.estimate_memory import estimate

        est = estimate(CONFIGS[size], [*overrides, "trainer.activation_checkpointing=trunk"])
        out.update({"memory_gib_amp_estimated": est["estimate_gib_amp"],
                    "memory_gib_fp32_upper_estimated": est["estimate_gib_fp32_upper"],
                    "micro_batch": f"{est['images_per_micro_batch']} images / {est['expressions_per_micro_batch']} "
                                   f"expressions at {est['resolution']} px, activation checkpointing: trunk"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--no-memory", action="store_true", help="skip the (slower) memory estimate")
    args = p.parse_args(argv)
    for size in args.sizes:
        for preset in PRESETS:
            print(json.dumps(row(size, preset, not args.no_memory)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
