"""Benchmark harness (benchmarks.bench_train, benchmarks.bench_eval): FLOP counting, peak table, CPU smoke runs.

The smoke runs use the demo model (configs/rsam_demo_cpu.yaml) at 64 px with a handful of steps; the GPU
numbers come from benchmarks/gpu_session.sh on a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def load_benchmark(name: str):
    """``benchmarks.<name>`` of this checkout. The package is run from the repository root, not installed, so
    it is registered from its folder (by file location, not by search path) the first time."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks", os.path.join(BENCH, "__init__.py"),
                                                      submodule_search_locations=[BENCH])
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"benchmarks.{name}")


def run_benchmark(name: str, args: list, timeout: int) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<name> ARGS`` from the repository root, as the README runs them."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


U = load_benchmark("_bench_utils")

DEMO_CONFIG = os.path.join(REPO, "configs", "rsam_demo_cpu.yaml")
SMOKE = ["--config", DEMO_CONFIG, "--resolution", "64", "--warmup", "1", "--iters", "2", "--tokens", "8",
         "--seed", "0"]
COMMON_FIELDS = {"bench", "config", "resolution", "images_per_step", "exprs_per_image", "tokens", "images_per_s",
                 "expressions_per_s", "step_ms", "step_ms_median", "step_ms_min", "peak_mem_gb", "peak_mem_kind",
                 "amp_dtype", "compile", "channels_last", "flops_per_step", "tflops_per_s", "peak_tflops",
                 "peak_tflops_source", "mfu", "flops_by_op", "gpu", "torch", "device", "warmup", "iters"}


# ---------------------------------------------------------------------------------------------- unit parts
def test_flop_counter_counts_linear_exactly():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    counted = U.count_flops(lambda: layer(x))
    assert counted["flops_per_step"] == 2 * 8 * 64 * 32


def test_flop_counter_counts_cpu_attention_forward_and_backward():
    """torch maps only the CUDA SDPA kernels; the harness adds the CPU flash kernels (forward + backward)."""
    q = torch.randn(2, 4, 64, 32, requires_grad=True)
    k = torch.randn(2, 4, 48, 32, requires_grad=True)
    v = torch.randn(2, 4, 48, 32, requires_grad=True)  # equal head dims: the CPU flash kernel, as in the model

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    counted = U.count_flops(step)
    b, h, lq, lk, d, dv = 2, 4, 64, 48, 32, 32
    forward = 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv
    # backward: recompute scores, dV, dP, dQ, dK
    backward = 2 * b * h * (lq * lk * d + lq * lk * dv + lk * lq * dv + lq * lk * d + d * lq * lk)
    assert counted["flops_per_step"] == forward + backward
    assert counted["flops_by_op"]["_scaled_dot_product_flash_attention_for_cpu"] == forward


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
])
def test_peak_table(name, peak):
    assert U.peak_for_gpu(name)[0] == peak


def test_peak_table_unknown_gpu_and_cpu():
    assert U.peak_for_gpu("Some Future GPU") is None
    value, source = U.peak_tflops(torch.device("cpu"), None)
    assert value is None and "CPU" in source
    assert U.peak_tflops(torch.device("cpu"), 100.0) == (100.0, "--peak-tflops")
    assert U.mfu(10**12, 1000.0, 10.0) == pytest.approx(0.1)  # 1 TFLOP in 1 s on a 10 TFLOP/s chip
    assert U.mfu(None, 1000.0, 10.0) is None


def test_synthetic_batch_shapes():
    from rsam.build import build_rsam
    from rsam.config import compose_config

    cfg = compose_config(DEMO_CONFIG, ["scratch.resolution=64"])
    model = build_rsam(cfg)
    b = U.synthetic_batch(model, images=3, exprs_per_image=2, tokens=7, device=torch.device("cpu"),
                          channels_last=False, seed=0)
    assert b.images.shape == (3, 3, 64, 64)
    assert b.expr_to_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.input_ids.shape == b.attention_mask.shape == (6, 7)
    assert int(b.input_ids.max()) < model.text_encoder.config.vocab_size
    assert b.masks.shape == (6, 64, 64) and b.masks.dtype == torch.bool
    assert bool(b.masks.flatten(1).any(1).all())  # every expression has a target: all loss terms active


# ---------------------------------------------------------------------------------------------- smoke runs
def _check_record(record: dict, bench: str, images: int, exprs: int) -> None:
    missing = COMMON_FIELDS - set(record)
    assert not missing, f"missing JSON fields {sorted(missing)}"
    assert record["bench"] == bench
    assert record["device"] == "cpu" and record["gpu"] is None and record["torch"] == torch.__version__
    assert record["resolution"] == 64 and record["images_per_step"] == images
    assert record["exprs_per_image"] == exprs and record["tokens"] == 8
    assert record["step_ms"] > 0 and record["step_ms_min"] <= record["step_ms_median"]
    assert record["images_per_s"] == pytest.approx(images / (record["step_ms"] / 1e3), rel=1e-6)
    assert record["expressions_per_s"] == pytest.approx(images * exprs / (record["step_ms"] / 1e3), rel=1e-6)
    assert record["peak_mem_gb"] > 0
    assert record["flops_per_step"] > 0 and record["mfu"] is None  # no peak for CPUs
    assert record["flops_by_op"].get("_scaled_dot_product_flash_attention_for_cpu", 0) > 0


def test_bench_train_and_eval_smoke(capsys):
    bench_eval, bench_train = load_benchmark("bench_eval"), load_benchmark("bench_train")

    train = bench_train.main(SMOKE + ["--images", "2", "--exprs-per-image", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(train))  # exactly one JSON line
    _check_record(train, "train", 2, 3)
    assert train["amp_dtype"] == "float32" and train["compile"] is False
    assert train["grad_clip"] == 1.0 and train["fused_adamw"] is True  # from the config's optim section
    assert 0 < train["params_trainable"] <= train["params_total"]
    assert train["flops_by_op"].get("convolution_backward", 0) > 0  # the backward pass was counted

    evaluation = bench_eval.main(SMOKE + ["--images", "2", "--exprs-per-image", "3"])
    capsys.readouterr()
    _check_record(evaluation, "eval", 2, 3)
    # Same batch: a training step = forward + backward (about twice the forward) of every trainable part.
    ratio = train["flops_per_step"] / evaluation["flops_per_step"]
    assert 2.5 < ratio < 3.5, ratio


def test_bench_eval_cli_profile_and_out(tmp_path):
    out, prof = tmp_path / "bench.jsonl", tmp_path / "profile.txt"
    proc = run_benchmark("bench_eval", SMOKE + ["--images", "2", "--channels-last", "--out", str(out),
                                                "--profile", str(prof)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    record = json.loads(lines[0])
    _check_record(record, "eval", 2, 1)
    assert record["channels_last"] is True
    assert json.loads(out.read_text().strip()) == record
    table = prof.read_text()
    assert "self_cpu_time_total" in table and "aten::" in table


def test_bench_bad_config_is_a_clear_error(tmp_path):
    proc = run_benchmark("bench_train", ["--config", str(tmp_path / "nope.yaml")], timeout=60)
    assert proc.returncode != 0
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_predict_smoke(capsys):
    """benchmarks.bench_predict: rsam-predict over a folder at batch 1 and 2 (3 images of 64 px)."""
    bench_predict = load_benchmark("bench_predict")
    threads = torch.get_num_threads()
    try:
        record = bench_predict.main(["--images", "3", "--size", "64", "--resolution", "64", "--batch-sizes", "1,2",
                                     "--warmup-images", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(record))  # exactly one JSON line
    assert record["bench"] == "predict" and record["images"] == 3 and record["resolution"] == 64
    assert [r["batch_size"] for r in record["runs"]] == [1, 2]
    for r in record["runs"]:
        assert r["wall_s"] > 0 and r["images_per_s"] == pytest.approx(3 / r["wall_s"], rel=1e-2)
    assert record["runs"][0]["speedup_vs_first_run"] == 1.0 and record["device"] == "cpu"


def test_bench_data_times_a_dataset_on_disk(tmp_path):
    """`benchmarks.bench_data --data-root` reads the user's dataset (here a small synthetic RISBench) instead of generating
    one, and prints one JSON line counting the samples it timed."""
    from rsam.data.synthetic import generate

    generate(str(tmp_path), 6, 64, seed=0, val_fraction=0.0, test_fraction=0.0, format="risbench")
    run = run_benchmark("bench_data", ["--format", "risbench", "--data-root", str(tmp_path), "--resolution", "64",
                                       "--iters", "8", "--batch-size", "4", "--warmup-batches", "1"], timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["format"] == "risbench" and out["data_root"] == str(tmp_path) and out["samples"] == 8
    assert out["samples_per_s_per_worker"] > 0 and out["generate_s"] == 0.0
    missing = run_benchmark("bench_data", ["--format", "risbench", "--data-root", str(tmp_path / "nowhere")],
                            timeout=300)
    assert missing.returncode == 1 and "nowhere: not a risbench dataset" in missing.stderr
    assert "Traceback" not in missing.stderr
