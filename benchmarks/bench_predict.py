"""Throughput of ``rsam-predict`` over a folder of images, batch 1 against ``--batch-size N``; one JSON line.

    python -m benchmarks.bench_predict                                   # demo model (random init), CPU, 100 x 512 px
    python -m benchmarks.bench_predict --checkpoint demo_output/checkpoints/best.pt --batch-sizes 1,8
    python -m benchmarks.bench_predict --config configs/rsam_b+_b.yaml --device cuda --batch-sizes 1,8,16

What is timed: the whole command, ``rsam.tools.predict.main`` in this process -- model loading, reading the
PNGs, resizing, the image encoder (B images per call), text encoder, fusion and decoder for every expression,
upsampling to 512 px, and writing the mask PNGs, the side-by-side overlays and predictions.jsonl (what a user
waits for). ``images_per_s`` divides the image count by that wall time; ``images_per_s_after_load``
subtracts the model-loading time measured separately (``load_s``). Inputs: synthetic aerial scenes
(``rsam.data.synthetic``) written as PNG, each with ``--exprs-per-image`` expressions (the same set for all).
Without ``--checkpoint`` the model of ``--config`` is randomly initialised (the numbers do not depend on the
weights) and saved as a training checkpoint with a small vocabulary. An untimed warm-up run of each batch size
comes first (the first calls of a shape are slower on CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from benchmarks import _bench_utils as U

DEMO_CONFIG = os.path.join(U.REPO, "configs", "rsam_demo_cpu.yaml")
EXPRESSIONS = ["the red ship", "the largest white building at the top left", "a vehicle on the left",
               "the second airplane from the right"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEMO_CONFIG, help="model config when no --checkpoint (default: the demo's)")
    p.add_argument("--checkpoint", default=None, help="checkpoint / pretrained directory (default: random init)")
    p.add_argument("--images", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--exprs-per-image", type=int, default=2, help="expressions per image (default 2)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated --batch-size values (default 1,8)")
    p.add_argument("--resolution", type=int, default=None, help="network resolution (default: the config's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup-images", type=int, default=None,
                   help="images of the untimed warm-up run of each batch size (default: the largest batch size)")
    p.add_argument("--out", default=None, metavar="FILE", help="also append the JSON line to FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of --config")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers")
    for name in ("images", "size", "exprs_per_image"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1 or not 1 <= args.exprs_per_image <= len(EXPRESSIONS):
        p.error(f"batch sizes must be >= 1 and --exprs-per-image at most {len(EXPRESSIONS)}")
    if args.warmup_images is None:
        args.warmup_images = max(args.batch_sizes)
    return args


def random_checkpoint(args, folder: str) -> str:
    """The model of ``args.config`` with random weights, saved as our checkpoint with a small vocabulary."""
    from omegaconf import OmegaConf

    from rsam.build import build_rsam

    words = sorted({w for e in EXPRESSIONS for w in e.split()})
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIALS + words) + "\n")
    cfg = U.load_config(args.config, [*args.overrides, f"scratch.vocab={vocab}"], args.resolution)
    torch.manual_seed(args.seed)
    model = build_rsam(cfg)
    path = os.path.join(folder, "random.pt")
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


def write_images(folder: str, count: int, size: int, seed: int) -> None:
    from rsam.data.synthetic import make_scene

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(make_scene(rng, size)[0]).save(os.path.join(folder, f"scene_{i:04d}.png"))


def run_cli(checkpoint: str, images: str, out: str, texts, batch_size: int, device: str) -> float:
    from rsam.tools.predict import main

    argv = ["--checkpoint", checkpoint, "--image", images, "--out", out, "--device", device,
            "--batch-size", str(batch_size), "--no-progress", "--quiet"]
    for t in texts:
        argv += ["--text", t]
    start = time.perf_counter()
    status = main(argv)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"rsam-predict exited with status {status}")
    return wall


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = EXPRESSIONS[:args.exprs_per_image]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        checkpoint = args.checkpoint or random_checkpoint(args, tmp)
        images = os.path.join(tmp, "images")
        write_images(images, args.images, args.size, args.seed)
        warm = os.path.join(tmp, "warm")
        write_images(warm, args.warmup_images, args.size, args.seed + 1)

        from rsam.predictor import RSAMPredictor

        start = time.perf_counter()
        predictor = RSAMPredictor.load(checkpoint, device=device)
        load_s = time.perf_counter() - start
        resolution = int(predictor.model.image_size)
        params = sum(p.numel() for p in predictor.model.parameters())
        del predictor
        U.log(f"bench_predict: {args.images} images of {args.size} px x {len(texts)} expressions, network "
              f"{resolution} px, {params / 1e6:.2f}M parameters, {device}, batch sizes {args.batch_sizes}")
        for b in dict.fromkeys(args.batch_sizes) if args.warmup_images else ():  # every batch shape once
            run_cli(checkpoint, warm, os.path.join(tmp, f"out_warm{b}"), texts, b, device)
        runs = []
        for b in args.batch_sizes:
            wall = run_cli(checkpoint, images, os.path.join(tmp, f"out_b{b}"), texts, b, device)
            runs.append({"batch_size": b, "wall_s": round(wall, 3), "images_per_s": args.images / wall,
                         "images_per_s_after_load": args.images / max(wall - load_s, 1e-9)})
            U.log(f"  --batch-size {b}: {wall:.1f} s, {args.images / wall:.2f} images/s")
    for r in runs:  # relative to the first run (batch 1 by default)
        r["speedup_vs_first_run"] = r["images_per_s"] / runs[0]["images_per_s"]
    record = {
        "bench": "predict",
        "config": U.display_path(args.config) if not args.checkpoint else None,
        "checkpoint": U.display_path(args.checkpoint) if args.checkpoint else "random init",
        "images": args.images, "image_size": args.size, "exprs_per_image": len(texts),
        "resolution": resolution, "params": params, "load_s": round(load_s, 3),
        "runs": runs,
        **U.environment(torch.device(device)),
    }
    U.emit(record, args.out)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
