"""Training-step throughput of RSAM on synthetic in-memory batches; prints one JSON line.

    python -m benchmarks.bench_train                                   # recipe: B+ / BERT-base, 800 px, 8 x 3
    python -m benchmarks.bench_train --compile --channels-last
    python -m benchmarks.bench_train --images 16 --resolution 1024
    python -m benchmarks.bench_train --config configs/rsam_demo_cpu.yaml --iters 2   # CPU smoke test

One step is the trainer's own :class:`training.step.TrainStep`: schedules set, bf16 autocast forward of uint8
``images`` (B,3,R,R) with B x k expressions of ``--tokens`` tokens, the config's ``loss:`` node, backward, global
L2 grad clip (``optim.gradient_clip``), AdamW over the config's parameter groups (fused on CUDA),
``zero_grad(set_to_none=True)``. Weights are random (no checkpoint files needed); the frozen/trainable split is
the config's. Peak memory is measured over the timed steps after warm-up.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import _bench_utils as U


def build_training(cfg, model, device: torch.device):
    """Loss, optimizer and clip value as the trainer builds them from the config."""
    from hydra.utils import instantiate

    from rsam.losses import RSAMLoss
    from training.optimizer import OptimConfig, build_optimizer

    loss_fn = instantiate(cfg.loss) if cfg.get("loss") is not None else RSAMLoss()
    loss_fn = loss_fn.to(device)
    # the trainer's validation of the `optim:` section (resolves ${scratch.*} against the whole config)
    from training.trainer import parse_section

    try:
        optim_conf = parse_section(OptimConfig, cfg.get("optim"), "optim")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not optim_conf.param_groups:
        # a model-only config: one group at the recipe's decoder lr
        from training.optimizer import GroupRule

        optim_conf.param_groups = [GroupRule(name="all", lr=5e-5)]
    optim = build_optimizer(model, optim_conf, device)
    return loss_fn, optim, optim_conf.gradient_clip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser, images=8, exprs=3)
    args = parser.parse_args(argv)
    setup = U.resolve_setup(args)
    device = setup.device
    torch.manual_seed(args.seed)

    cfg = U.load_config(args.config, args.overrides, args.resolution)
    model = U.build_model(cfg, device, mode="train", channels_last=args.channels_last)
    ac = (cfg.get("trainer") or {}).get("activation_checkpointing")
    if ac:  # the recipe's memory lever, as the trainer applies it (e.g. configs/rsam_b+_b_1gpu.yaml)
        model.set_activation_checkpointing(trunk=True, transformers=ac == "all")
    loss_fn, optim, clip = build_training(cfg, model, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = U.synthetic_batch(model, args.images, args.exprs_per_image, args.tokens, device,
                              args.channels_last, args.seed)
    U.log(f"bench_train: {args.config} at {model.image_size}px, {args.images} images x {args.exprs_per_image} "
          f"expressions x {args.tokens} tokens on {device}, {sum(p.numel() for p in trainable) / 1e6:.1f}M "
          f"trainable / {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    from training.step import TrainStep

    def make_step(net):
        train_step = TrainStep(net, loss_fn, optim, clip, setup.amp_dtype)
        return lambda: train_step(batch, 0.5)

    flops, timing, memory = U.measure(model, make_step, setup, args, device)
    peak, peak_src = U.peak_tflops(device, args.peak_tflops)
    step_s = timing["step_ms"] / 1e3
    n_expr = args.images * args.exprs_per_image
    record = {
        "bench": "train",
        "config": U.display_path(args.config),
        "overrides": list(args.overrides),
        "resolution": int(model.image_size),
        "images_per_step": args.images,
        "exprs_per_image": args.exprs_per_image,
        "tokens": args.tokens,
        "images_per_s": args.images / step_s,
        "expressions_per_s": n_expr / step_s,
        **timing,
        **memory,
        "amp_dtype": str(setup.amp_dtype).replace("torch.", "") if setup.amp_dtype else "float32",
        "compile": bool(args.compile),
        "compile_mode": args.compile_mode,
        "channels_last": bool(args.channels_last),
        "activation_checkpointing": ac,
        "fused_adamw": bool(optim.optimizer.defaults.get("fused")),
        "grad_clip": clip,
        "flops_per_step": flops["flops_per_step"],
        "tflops_per_s": flops["flops_per_step"] / step_s / 1e12 if flops["flops_per_step"] else None,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src,
        "mfu": U.mfu(flops["flops_per_step"], timing["step_ms"], peak),
        "flops_by_op": flops["flops_by_op"],
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "warmup": setup.warmup,
        "iters": setup.iters,
        "profile": args.profile,
        **U.environment(device),
    }
    U.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
