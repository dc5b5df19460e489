"""Shared pieces of ``bench_train.py`` and ``bench_eval.py``: config, model, synthetic batch, timing, FLOPs.

Both benchmarks build the model from a Hydra YAML (random weights, no checkpoint files), feed synthetic
in-memory batches of a fixed shape, time steady-state steps after a warm-up (CUDA events on GPU,
``time.perf_counter`` on CPU) and print one JSON line. FLOPs come from one step counted with
``torch.utils.flop_counter.FlopCounterMode`` on the eager model; MFU divides the achieved FLOP rate by the
dense bf16 peak of the GPU (table below, or ``--peak-tflops``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from rsam.data.batch import Batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIG = os.path.join(REPO, "configs", "rsam_b+_b.yaml")

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. Matched as
# case-insensitive substrings of torch.cuda.get_device_name(), first hit wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),  # same GH100 chip and clocks as the H100 SXM; only memory differs
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16 on Volta)
)


def peak_for_gpu(name: str) -> Optional[tuple]:
    """(dense bf16 peak TFLOP/s, table key) for a GPU name, or None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, key
    return None


def peak_tflops(device: torch.device, override: Optional[float]) -> tuple:
    """(peak TFLOP/s or None, where the number came from)."""
    if override is not None:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak table for CPUs (pass --peak-tflops for an MFU)"
    name = torch.cuda.get_device_name(device)
    hit = peak_for_gpu(name)
    if hit is None:
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    return hit[0], f"table: {hit[1]} dense bf16"


# ------------------------------------------------------------------------------------------------ arguments
def add_common_args(parser: argparse.ArgumentParser, images: int, exprs: int) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Hydra YAML with a `model:` node "
                        "(default configs/rsam_b+_b.yaml)")
    parser.add_argument("--images", type=int, default=images, help=f"images per step (default {images})")
    parser.add_argument("--exprs-per-image", type=int, default=exprs,
                        help=f"expressions per image (default {exprs})")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per expression incl. [CLS] (default 20)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size R (default: the config's; 800 for the recipe)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU / 2 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 30 GPU / 3 CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="autocast dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step (no MFU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak used for MFU")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also profile a few steps and write the top-kernel table to FILE")
    parser.add_argument("--out", default=None, metavar="FILE", help="also append the JSON line to FILE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the config, e.g. model.num_heads=4")


@dataclass
class Setup:
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    warmup: int
    iters: int


def resolve_setup(args: argparse.Namespace) -> Setup:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    gpu = device.type == "cuda"
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    amp_dtype = torch.bfloat16 if dtype == "bf16" else None
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    iters = args.iters if args.iters is not None else (30 if gpu else 3)
    if iters < 1 or warmup < 0:
        raise SystemExit(f"--iters must be >= 1 and --warmup >= 0, got {iters} / {warmup}")
    for name in ("images", "exprs_per_image", "tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Setup(device, amp_dtype, warmup, iters)


# --------------------------------------------------------------------------------------------------- config
def load_config(path: str, overrides: List[str], resolution: Optional[int]):
    """Compose the YAML like ``training/train.py`` does, with overrides; ``resolution`` sets the image size."""
    from omegaconf import OmegaConf, open_dict

    from rsam.config import compose_config

    try:
        cfg = compose_config(path, list(overrides))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if "model" not in cfg:
        raise SystemExit(f"{path}: no `model:` node")
    if resolution is not None:
        with open_dict(cfg):
            # Follow the config's own indirection so that everything derived from the resolution moves too.
            if OmegaConf.select(cfg, "scratch.resolution") is not None:
                cfg.scratch.resolution = int(resolution)
            else:
                cfg.model.image_size = int(resolution)
    return cfg


def build_model(cfg, device: torch.device, mode: str, channels_last: bool):
    from rsam.build import build_rsam

    model = build_rsam(cfg, device=device, mode=mode)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------------- batch
def synthetic_batch(model, images: int, exprs_per_image: int, tokens: int, device: torch.device,
                    channels_last: bool, seed: int) -> Batch:
    """A :class:`Batch` on ``device``: random uint8 images (B,3,R,R), B x k expressions of ``tokens`` real tokens,
    disc-shaped ground-truth masks of a few percent of the image (so every loss term is active)."""
    g = torch.Generator().manual_seed(seed)
    r = int(model.image_size)
    n = images * exprs_per_image
    vocab = int(model.text_encoder.config.vocab_size)
    imgs = torch.randint(0, 256, (images, 3, r, r), generator=g, dtype=torch.uint8)
    # Tokens: [CLS]-like first id, then random word pieces; every position real (the recipe's 20 tokens).
    low = min(1000, max(vocab // 2, 1))
    ids = torch.randint(low, vocab, (n, tokens), generator=g)
    ids[:, 0] = min(101, vocab - 1)
    yy, xx = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    centres = torch.rand(n, 2, generator=g) * r * 0.6 + r * 0.2
    radius = r * (0.05 + 0.1 * torch.rand(n, generator=g))
    dist2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    if channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    batch = Batch(images=imgs, masks=dist2 <= radius[:, None, None] ** 2,
                  expr_to_image=torch.arange(images).repeat_interleave(exprs_per_image),
                  input_ids=ids, attention_mask=torch.ones(n, tokens, dtype=torch.long),
                  is_negative=torch.zeros(n, dtype=torch.bool), orig_sizes=torch.full((images, 2), r),
                  categories=["synthetic"] * n, sample_ids=[(f"image{i // exprs_per_image}", i) for i in range(n)])
    return batch.to(device)


# --------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> Dict[str, float]:
    """Run ``warmup`` untimed then ``iters`` timed calls of ``step``; mean / median / min step time in ms.

    On CUDA every step is bracketed by events (no host sync inside the timed region except the one at the
    very end), so the per-step numbers include the GPU work, not just the launch time.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    times: List[float] = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for i in range(iters):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        times = [events[i].elapsed_time(events[i + 1]) for i in range(iters)]
    else:
        t = time.perf_counter()
        for _ in range(iters):
            step()
            now = time.perf_counter()
            times.append((now - t) * 1e3)
            t = now
    ordered = sorted(times)
    return {
        "step_ms": sum(times) / len(times),
        "step_ms_median": ordered[len(ordered) // 2],
        "step_ms_min": ordered[0],
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> Dict[str, object]:
    """Peak GPU memory allocated by tensors (GB, 1e9 bytes), or the CPU process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
                "peak_mem_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 3),
                "peak_mem_kind": "cuda max_memory_allocated (since warm-up)"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_mem_gb": round(rss_kb * 1024 / 1e9, 3), "peak_mem_kind": "cpu process max RSS"}


# ---------------------------------------------------------------------------------------------------- FLOPs
def _flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention kernels (torch maps only the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_sdpa_backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(step: Callable[[], None]) -> Dict[str, object]:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; elementwise ops are not counted)."""
    counter = _flop_counter()
    with counter:
        step()
    by_op: Dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op).split(".")[-1] if "." in str(op) else str(op)] = int(n)
    return {"flops_per_step": int(counter.get_total_flops()), "flops_by_op": by_op}


# ---------------------------------------------------------------------------------------------------- report
def environment(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def mfu(flops_per_step: Optional[int], step_ms: float, peak: Optional[float]) -> Optional[float]:
    if not flops_per_step or not peak or step_ms <= 0:
        return None
    return flops_per_step / (step_ms / 1e3) / (peak * 1e12)


def write_profile(step: Callable[[], None], device: torch.device, path: str, steps: int = 3, rows: int = 40) -> None:
    """Profile ``steps`` calls of ``step`` and write the top-``rows`` kernels / ops table to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=80)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=rows,
                                                                max_name_column_width=60)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {steps} profiled steps, sorted by {sort_by}\n\n{table}\n\n# by input shape\n\n{shapes}\n")


def display_path(path: str) -> str:
    """Relative to the repository when inside it, else absolute."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO) if full.startswith(REPO + os.sep) else full


def emit(record: Dict[str, object], out: Optional[str]) -> None:
    """Print the one JSON line on stdout (everything else goes to stderr) and optionally append it to a file."""
    line = json.dumps(record, sort_keys=False)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(model, make_step, setup, args, device):
    """FLOPs of one eager step, then warm-up and timed steps of the (optionally compiled) model.

    ``make_step(net)`` returns a zero-argument callable running one step on ``net``. FLOPs are counted on the
    eager model because the counter sees dispatcher ops, which compiled graphs hide. Returns
    ``(flops, timing, peak_memory)``; writes a profile when ``args.profile`` is set.
    """
    flops = {"flops_per_step": None, "flops_by_op": {}}
    if not args.no_flops:
        flops = count_flops(make_step(model))
    net = torch.compile(model, mode=args.compile_mode) if args.compile else model
    step = make_step(net)
    for _ in range(setup.warmup):
        step()
    synchronize(device)
    reset_peak_memory(device)
    timing = time_steps(step, device, warmup=0, iters=setup.iters)
    memory = peak_memory(device)
    if args.profile:
        write_profile(step, device, args.profile)
    return flops, timing, memory
