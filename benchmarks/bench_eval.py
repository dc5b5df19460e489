"""Evaluation (inference) throughput of RSAM on synthetic in-memory batches; prints one JSON line.

    python -m benchmarks.bench_eval                                    # recipe: B+ / BERT-base, 800 px, 32 x 1
    python -m benchmarks.bench_eval --compile --channels-last
    python -m benchmarks.bench_eval --config configs/rsam_demo_cpu.yaml --iters 2    # CPU smoke test

One step is the evaluation engine's forward (:func:`rsam.evaluation.eval_step`, what the trainer's validation,
``training/eval.py`` and this benchmark all run): ``model.eval()``, ``torch.no_grad()``, bf16 autocast, uint8
images, B images with k expressions each (default 32 x 1), full-resolution logits (N,1,R,R) produced. Metric
accumulation is not included (it is a few reductions per expression).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import _bench_utils as U
from rsam.evaluation import eval_step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser, images=32, exprs=1)
    args = parser.parse_args(argv)
    setup = U.resolve_setup(args)
    device = setup.device
    torch.manual_seed(args.seed)

    cfg = U.load_config(args.config, args.overrides, args.resolution)
    model = U.build_model(cfg, device, mode="eval", channels_last=args.channels_last)
    # Inference needs no parameter gradients. (Also keeps FlopCounterMode's module tracker from tripping over
    # parameter views made under no_grad, which still report requires_grad=True.)
    model.requires_grad_(False)
    batch = U.synthetic_batch(model, args.images, args.exprs_per_image, args.tokens, device,
                              args.channels_last, args.seed)
    U.log(f"bench_eval: {args.config} at {model.image_size}px, {args.images} images x {args.exprs_per_image} "
          f"expressions x {args.tokens} tokens on {device}")

    def make_step(net):
        @torch.no_grad()
        def step() -> None:
            # the logits are what the metrics consume; summing them keeps the work from being skipped lazily
            eval_step(net, batch, setup.amp_dtype).logits.sum()
        return step

    flops, timing, memory = U.measure(model, make_step, setup, args, device)
    peak, peak_src = U.peak_tflops(device, args.peak_tflops)
    step_s = timing["step_ms"] / 1e3
    record = {
        "bench": "eval",
        "config": U.display_path(args.config),
        "overrides": list(args.overrides),
        "resolution": int(model.image_size),
        "images_per_step": args.images,
        "exprs_per_image": args.exprs_per_image,
        "tokens": args.tokens,
        "images_per_s": args.images / step_s,
        "expressions_per_s": args.images * args.exprs_per_image / step_s,
        **timing,
        **memory,
        "amp_dtype": str(setup.amp_dtype).replace("torch.", "") if setup.amp_dtype else "float32",
        "compile": bool(args.compile),
        "compile_mode": args.compile_mode,
        "channels_last": bool(args.channels_last),
        "flops_per_step": flops["flops_per_step"],
        "tflops_per_s": flops["flops_per_step"] / step_s / 1e12 if flops["flops_per_step"] else None,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src,
        "mfu": U.mfu(flops["flops_per_step"], timing["step_ms"], peak),
        "flops_by_op": flops["flops_by_op"],
        "params_total": sum(p.numel() for p in model.parameters()),
        "warmup": setup.warmup,
        "iters": setup.iters,
        "profile": args.profile,
        **U.environment(device),
    }
    U.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
