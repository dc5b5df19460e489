"""Estimate the training memory of a recipe without a GPU; prints one JSON object.

    python -m benchmarks.estimate_memory -c configs/rsam_b+_b_1gpu.yaml
    python -m benchmarks.estimate_memory -c configs/rsam_b+_b.yaml --images 8 --expressions 24

Method (no weights, no GPU): the model is built on the meta device and one training forward + backward is run
there (shapes only). Every tensor autograd saves for the backward pass is counted through
``torch.autograd.graph.saved_tensors_hooks`` (parameters and views of them excluded): that is the activation
memory at its peak, just before backward. Static memory: fp32 weights (all parameters), fp32 gradients and two
AdamW moments (trainable parameters), and LoRA / freeze presets change only the trainable count. Under bf16 /
fp16 autocast most saved activations are half precision, so the activation figure is given in fp32 (upper
bound) and with every floating activation at 2 bytes (lower bound). Attention (``scaled_dot_product_attention``)
is counted as the GPU's flash / memory-efficient kernels keep it: q, k, v, the output and the log-sum-exp, never
the L x L probabilities (the CPU math path would save those). Not counted: the CUDA context (~0.5 GB),
allocator fragmentation and cuDNN / SDPA workspaces (typically 10-20 % on top), the data loader's pinned memory.
The estimate of a GPU run is ``static + activations``; compare it with ``torch.cuda.max_memory_allocated()``
from ``python -m benchmarks.bench_train`` where a GPU is available.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

GiB = 2 ** 30


class _FusedAttention(torch.autograd.Function):
    """Shapes-only stand-in for a fused SDPA kernel: saves what flash attention saves for its backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(q, k, v)


def estimate(config: str, overrides=(), images=None, expressions=None, tokens: int = 20) -> dict:
    from hydra.utils import instantiate

    from rsam.config import compose_config
    from rsam.finetune import apply_finetune
    from rsam.losses import RSAMLoss

    cfg = compose_config(config, list(overrides))
    b = int(images or cfg.scratch.train_batch_size)
    n = int(expressions or cfg.scratch.max_exprs_per_batch)
    r = int(cfg.model.image_size)
    ac = cfg.trainer.get("activation_checkpointing")
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
        model = apply_finetune(model, cfg.get("finetune"))
        if ac:
            model.set_activation_checkpointing(trunk=True, transformers=ac == "all")
        model.train()
        params = list(model.parameters())
        param_ids = {id(p) for p in params}
        saved = {"float": 0, "other": 0, "float_elems": 0}

        def pack(t: torch.Tensor):
            if id(t) in param_ids or (t._base is not None and id(t._base) in param_ids):
                return t
            key = "float" if t.is_floating_point() else "other"
            saved[key] += t.numel() * t.element_size()
            if key == "float":
                saved["float_elems"] += t.numel()
            return t

        images_t = torch.zeros(b, 3, r, r, dtype=torch.uint8)
        ids = torch.ones(n, tokens, dtype=torch.long)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(images_t, torch.zeros(n, dtype=torch.long), ids, torch.ones_like(ids))
                loss = RSAMLoss(reduce_across_ranks=False)(out, torch.zeros(n, r, r, dtype=torch.bool))["core_loss"]
            loss.backward()
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    static = 4 * total + (4 + 8) * trainable
    act_fp32 = saved["float"] + saved["other"]
    act_half = 2 * saved["float_elems"] + saved["other"]
    accum = int(cfg.trainer.get("grad_accumulation", 1))
    return {
        "config": config, "overrides": list(overrides), "resolution": r, "images_per_micro_batch": b,
        "expressions_per_micro_batch": n, "grad_accumulation": accum,
        "images_per_step_per_gpu": b * accum, "activation_checkpointing": ac,
        "parameters": total, "trainable_parameters": trainable,
        "static_gib": round(static / GiB, 2),
        "activations_gib_fp32": round(act_fp32 / GiB, 2), "activations_gib_half": round(act_half / GiB, 2),
        "estimate_gib_amp": round((static + act_half) / GiB, 2),
        "estimate_gib_fp32_upper": round((static + act_fp32) / GiB, 2),
        "method": "meta-device forward+backward; saved-tensor bytes (attention as fused kernels keep it) + fp32 "
                  "weights/grads/AdamW moments; excludes CUDA context, fragmentation and workspaces",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default="configs/rsam_b+_b_1gpu.yaml")
    p.add_argument("--images", type=int, default=None, help="images per micro-batch (default: the recipe's)")
    p.add_argument("--expressions", type=int, default=None, help="expressions per micro-batch (default: the cap)")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.activation_checkpointing=null")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config):
        print(f"estimate_memory: config not found: {args.config}", file=sys.stderr)
        return 2
    print(json.dumps(estimate(args.config, args.overrides, args.images, args.expressions, args.tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
