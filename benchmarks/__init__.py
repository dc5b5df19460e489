"""Benchmark scripts, one JSON line (or document) each. A package run from the repository root:

    python -m benchmarks.bench_train --config configs/rsam_demo_cpu.yaml --iters 2

(the configs they read are repository paths, so they are not installed with ``rsam``; README "Benchmarks").
"""
