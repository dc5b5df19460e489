"""``training/train.py --seeds 1,2,3``: one training run per seed, each in its own folder.

    python training/train.py -c configs/rsam_b+_b.yaml --num-gpus 4 --seeds 1,2,3
    # -> rsam_logs/rsam_b+_b/seed1, .../seed2, .../seed3 (or <--log-dir>/seed<k>), trainer.seed = k in each
    rsam-compare --table rsam_logs/rsam_b+_b/seed* rsam_logs/other/seed*

Each seed is the same command line with ``--log-dir <base>/seed<k>`` and the override ``trainer.seed=<k>``,
run one after the other (each submitted as its own job with ``--use-cluster 1``), so a run of a sweep is an
ordinary run: re-running the sweep resumes each seed from its own checkpoint. The trainer's test writes
``seed<k>/eval_<split>/`` with the seed recorded, which ``rsam-compare --table`` groups by config.
(The launcher composes one config per command, so a Hydra multirun ``-m trainer.seed=1,2,3`` does not apply.)
"""
from __future__ import annotations

import argparse
import os
from typing import List, Sequence

from rsam.errors import UserError

__all__ = ["parse_seeds", "seed_argvs"]


def parse_seeds(text: str) -> List[int]:
    """``"1,2,3"`` -> [1, 2, 3] (argparse type: a bad list is a usage error)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def _drop_option(argv: List[str], flag: str) -> List[str]:
    """``argv`` without ``flag VALUE`` and ``flag=VALUE``."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            out.append(token)
    return out


def seed_argvs(argv: Sequence[str], seeds: Sequence[int], base_log_dir: str) -> List[List[str]]:
    """The command line of each seed's run: ``argv`` without ``--seeds`` / ``--log-dir``, plus
    ``--log-dir <base_log_dir>/seed<k>`` and ``trainer.seed=<k>``."""
    if any(token.lstrip("+").startswith("trainer.seed=") for token in argv):
        raise UserError("--seeds sets trainer.seed in each run: drop the trainer.seed override")
    kept = _drop_option(_drop_option(list(argv), "--seeds"), "--log-dir")
    return [kept + ["--log-dir", os.path.join(base_log_dir, f"seed{s}"), f"trainer.seed={s}"] for s in seeds]
