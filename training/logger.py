"""Logging: text log, JSON-lines stats, TensorBoard scalars/images, and a tqdm progress bar.

Only rank 0 writes files; other ranks log warnings and errors to the console. Files under the experiment dir:
  logs/log.txt                          the text log (rank 0)
  logs/{train,val,test}_stats.jsonl     one JSON object per epoch (or per evaluation)
  tensorboard/                          scalars (every loss term, lr per group, metrics) and overlays
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict, Optional

import torch
from tqdm import tqdm

LOG = logging.getLogger("rsam.train")


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through tqdm so log lines do not break an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # same policy as logging.StreamHandler: report, never raise from logging
            self.handleError(record)


def setup_logging(log_dir: str, rank: int) -> None:
    """Console logging on every rank (rank 0: INFO, others: WARNING) and ``logs/log.txt`` on rank 0."""
    root = logging.getLogger("rsam")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank == 0:
        os.makedirs(os.path.join(log_dir, "logs"), exist_ok=True)
        file = logging.FileHandler(os.path.join(log_dir, "logs", "log.txt"), mode="a")
        file.setFormatter(fmt)
        root.addHandler(file)


class ExperimentLogger:
    """TensorBoard + JSON-lines writer; a no-op on ranks other than 0."""

    def __init__(self, log_dir: str, rank: int, tensorboard: bool = True):
        self.enabled = rank == 0
        self.log_dir = log_dir
        self.writer = None
        if self.enabled:
            os.makedirs(os.path.join(log_dir, "logs"), exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(log_dir, "tensorboard"), flush_secs=30)

    def scalars(self, values: Dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: (3,H,W) float in [0,1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def json(self, phase: str, record: dict) -> None:
        """Append ``record`` as one line to ``logs/<phase>_stats.jsonl``."""
        if self.enabled:
            with open(os.path.join(self.log_dir, "logs", f"{phase}_stats.jsonl"), "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """tqdm bar (shows ETA); disabled off rank 0 or when asked (e.g. non-interactive logs)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                leave=False, file=sys.stdout, mininterval=1.0)


def format_metrics(metrics: Dict[str, float], keys: Optional[list] = None) -> str:
    """``"k1 0.1234  k2 0.5678"`` for ``keys`` (default all, sorted) that are in ``metrics``."""
    keys = keys or sorted(metrics)
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
