"""Scene mode of ``rsam-predict`` on a large synthetic GeoTIFF: tiles/s and peak memory; one JSON line.

    python benchmarks/bench_scene.py                           # 12000 x 12000 px, demo model (random init), CPU
    python benchmarks/bench_scene.py --size 4000 --scene-mode overview --checkpoint demo_output/checkpoints/best.pt
    python benchmarks/bench_scene.py --device cuda --batch-size 32

What is timed: the whole command, ``python -m rsam.tools.predict --scene`` in a child process -- model loading,
the windowed reads, the image encoder on every tile (``--batch-size`` tiles a call), the decoder for every
expression, the streamed merge, the Cloud-Optimized GeoTIFF and GeoJSON of each mask and the overview
picture. ``peak_rss_gb`` is that process's peak resident set size (the kernel's ``ru_maxrss`` of the child).
``tiles_per_s`` divides the tiles run by the wall time. The scene comes from :mod:`rsam.scene.synthetic` (3-band
uint8, EPSG:32633, written once before timing; ``--scene FILE`` reuses one). Without ``--checkpoint`` the model
of ``--config`` is randomly initialised: its masks cover about half of every tile, so ``overview`` mode runs
every tile too and ``tiles`` (the default here) is the honest worst case either way.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import _bench_utils as U
import torch

DEMO_CONFIG = os.path.join(U.REPO, "configs", "rsam_demo_cpu.yaml")
EXPRESSIONS = ["the red ship", "the white storage tank"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEMO_CONFIG, help="model config when no --checkpoint (default: the demo's)")
    p.add_argument("--checkpoint", default=None, help="checkpoint / pretrained directory (default: random init)")
    p.add_argument("--size", type=int, default=12000, help="scene side in pixels (default 12000)")
    p.add_argument("--objects", type=int, default=400, help="objects placed in the scene (default 400)")
    p.add_argument("--scene", default=None, metavar="FILE", help="use this GeoTIFF instead of generating one")
    p.add_argument("--scene-mode", choices=("overview", "tiles"), default="tiles")
    p.add_argument("--exprs", type=int, default=1, help=f"expressions (1-{len(EXPRESSIONS)}, default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per image-encoder call (default 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, metavar="FILE", help="also append the JSON line to FILE")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size < 1 or args.batch_size < 1 or not 1 <= args.exprs <= len(EXPRESSIONS):
        p.error(f"--size and --batch-size must be >= 1, --exprs between 1 and {len(EXPRESSIONS)}")
    return args


def random_checkpoint(config: str, folder: str) -> str:
    """The model of ``config`` with random weights, saved as our checkpoint with a small vocabulary."""
    from omegaconf import OmegaConf

    from rsam.build import build_rsam

    vocab = os.path.join(folder, "vocab.txt")
    words = sorted({w for e in EXPRESSIONS for w in e.split()})
    with open(vocab, "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    cfg = U.load_config(config, [f"scratch.vocab={vocab}"], None)
    torch.manual_seed(0)
    path = os.path.join(folder, "random.pt")
    torch.save({"model": build_rsam(cfg).state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_scene_") as tmp:
        scene = args.scene
        if scene is None:
            from rsam.scene.synthetic import write_synthetic_scene

            scene = os.path.join(tmp, "scene.tif")
            start = time.perf_counter()
            write_synthetic_scene(scene, args.size, objects=args.objects, seed=args.seed)
            U.log(f"bench_scene: wrote a {args.size} px scene in {time.perf_counter() - start:.0f} s")
        checkpoint = args.checkpoint or random_checkpoint(args.config, tmp)
        out = os.path.join(tmp, "out")
        cmd = [sys.executable, "-m", "rsam.tools.predict", "--checkpoint", checkpoint, "--image", scene,
               "--out", out, "--scene", "--scene-mode", args.scene_mode, "--batch-size", str(args.batch_size),
               "--device", device, "--no-progress", "--quiet"]
        for text in EXPRESSIONS[:args.exprs]:
            cmd += ["--text", text]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=U.REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"rsam-predict exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
        with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        mask_mb = sum(os.path.getsize(os.path.join(out, x["mask_geotiff"])) for x in lines) / 1e6
    first = lines[0]
    tiles = max(x["scene"]["tiles_run"] for x in lines)
    record = {
        "bench": "scene",
        "checkpoint": U.display_path(args.checkpoint) if args.checkpoint else "random init",
        "config": None if args.checkpoint else U.display_path(args.config),
        "height": first["height"], "width": first["width"], "scene_mode": args.scene_mode,
        "exprs": len(lines), "tile": first["scene"]["tile"], "overlap": first["scene"]["overlap"],
        "tiles_total": first["scene"]["tiles_total"], "tiles_run": tiles, "batch_size": args.batch_size,
        "wall_s": round(wall, 1), "tiles_per_s": round(tiles / wall, 2),
        "peak_rss_gb": round(peak_kb * 1024 / 1e9, 3), "mask_files_mb": round(mask_mb, 2),
        **U.environment(torch.device(device)),
    }
    U.emit(record, args.out)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
