"""Launch RSAM training or evaluation from a Hydra YAML config.

    python training/train.py -c configs/rsam_b+_b.yaml --num-gpus 4
    python training/train.py -c configs/rsam_tiny_cpu.yaml --num-gpus 0 scratch.train_batch_size=4 trainer.max_epochs=2
    torchrun --nnodes 2 --nproc-per-node 8 ... training/train.py -c configs/rsam_b+_b.yaml
    python training/train.py -c configs/rsam_b+_b.yaml --use-cluster 1 --num-nodes 2 --num-gpus 8 --partition p
    python training/train.py -c configs/rsam_b+_b.yaml --num-gpus 0 --print-optim-plan     # lr / wd per parameter
    python training/train.py -c configs/rsam_b+_b.yaml --num-gpus 4 --seeds 1,2,3          # a run per seed: <log dir>/seed<k>
    rsam-train -c configs/rsam_b+_b.yaml --num-gpus 4                                        # the same, installed

The other arguments, anywhere among the flags, are Hydra overrides. Where it runs:
  * under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set): this process joins that process group;
  * ``--use-cluster 1``: submits one SLURM task per GPU through submitit (``pip install submitit``);
  * otherwise locally: ``--num-gpus 0`` trains on the CPU in this process; ``--num-gpus 1`` on one GPU in this
    process (breakpoints work); ``--num-gpus N`` spawns N processes, one per GPU. With
    ``trainer.accelerator=cpu``, ``--num-gpus N`` spawns N CPU processes talking over gloo (for testing DDP).

The experiment dir (``--log-dir``, default ``rsam_logs/<config name>``) gets ``config.yaml`` (the composed config
with every override and flag applied) and ``config_resolved.yaml`` before anything starts; re-running with the
same dir resumes from ``checkpoints/checkpoint.pt``. ``--print-optim-plan`` builds the model (on the meta device)
and the optimizer only, prints every trainable parameter's lr and weight decay at training progress 0, 0.25, 0.5,
0.75 and 1 as one JSON object, and exits.

Needs the package installed (``pip install -e .``), which is what makes ``rsam`` and ``training`` importable.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import signal
import sys
import traceback
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from rsam.cli import FAILED, INTERRUPTED, STOPPED, USAGE, run_command
from rsam.config import compose_config
from rsam.errors import UserError
from training.seed_sweep import parse_seeds, seed_argvs

LOG = logging.getLogger("rsam.train")


def apply_flags(cfg: DictConfig, args: argparse.Namespace) -> DictConfig:
    """Write the launcher flags into ``cfg.launcher`` / ``cfg.trainer`` so the saved config is what runs."""
    with open_dict(cfg):
        _apply_flags(cfg, args)
    return cfg


def _apply_flags(cfg: DictConfig, args: argparse.Namespace) -> None:
    launcher = cfg.setdefault("launcher", {})
    for key in ("num_gpus", "num_nodes", "use_cluster", "partition", "account", "qos"):
        value = getattr(args, key)
        if value is not None:
            launcher[key] = bool(value) if key == "use_cluster" else value
    launcher.setdefault("num_gpus", 1)
    launcher.setdefault("num_nodes", 1)
    launcher.setdefault("use_cluster", False)
    if args.log_dir is not None:
        launcher["experiment_log_dir"] = args.log_dir
    if launcher.get("experiment_log_dir") is None:
        launcher["experiment_log_dir"] = os.path.join("rsam_logs", os.path.splitext(os.path.basename(args.config))[0])
    launcher["experiment_log_dir"] = os.path.abspath(launcher["experiment_log_dir"])
    if launcher["num_gpus"] == 0:
        cfg.trainer.accelerator = "cpu"


def save_config(cfg: DictConfig, log_dir: str) -> None:
    os.makedirs(log_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(log_dir, "config.yaml"))
    OmegaConf.save(cfg, os.path.join(log_dir, "config_resolved.yaml"), resolve=True)


def run_trainer(cfg: DictConfig) -> Optional[int]:
    """Entry point of every training process; ranks come from the environment. Returns :data:`STOPPED` when
    the run saved and stopped before its end, else None."""
    from training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return STOPPED if trainer.stopped_early else None


def _spawned_worker(local_rank: int, cfg: DictConfig, world_size: int, port: int, stopped) -> None:
    # Its own process group: a terminal's Ctrl-C reaches only the launcher, which passes it on once.
    os.setpgrp()
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    status = run_command("rsam-train", lambda: run_trainer(cfg))
    if status == STOPPED:  # exit 0: a non-zero exit makes the launcher terminate ranks still saving
        stopped.value = 1
    elif status:
        sys.exit(status)


def launch_local(cfg: DictConfig) -> Optional[int]:
    nproc = max(1, int(cfg.launcher.num_gpus))
    if nproc == 1:
        return run_trainer(cfg)
    import torch.multiprocessing as mp

    port = random.Random().randint(*cfg.launcher.get("port_range", [20000, 60000]))
    stopped = mp.get_context("spawn").Value("i", 0)
    ctx = mp.start_processes(_spawned_worker, args=(cfg, nproc, port, stopped), nprocs=nproc,
                             start_method="spawn", join=False)

    # SLURM or a user signals this parent only: pass it on so that every rank saves and stops (Ctrl-C, too:
    # the ranks have their own process group; a hang-up still ends them, as it did before).
    def forward(signum, frame):
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as exc:
        print(f"rsam-train: process {exc.error_index} exited with code {exc.exit_code} (its message is above)",
              file=sys.stderr)
        raise SystemExit(exc.exit_code if exc.exit_code in (USAGE, INTERRUPTED) else FAILED) from None
    return STOPPED if stopped.value else None


class SubmititRunner:
    """The callable submitit runs on every SLURM task; requeued on preemption (``checkpoint``)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __call__(self) -> None:
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(self.cfg.launcher.master_port),
                          RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                          WORLD_SIZE=str(env.num_tasks))
        try:
            run_trainer(self.cfg)
        except Exception:
            LOG.error("training failed on rank %d:\n%s", env.global_rank, traceback.format_exc())
            raise

    def checkpoint(self):
        import submitit

        # The trainer already saved checkpoints/checkpoint.pt; the requeued job resumes from it.
        return submitit.helpers.DelayedSubmission(SubmititRunner(self.cfg))


def launch_slurm(cfg: DictConfig) -> None:
    try:
        import submitit
    except ImportError:
        raise UserError("--use-cluster 1 needs submitit: pip install submitit (or pip install -e '.[slurm]')") from None
    lc = cfg.launcher
    executor = submitit.AutoExecutor(folder=os.path.join(lc.experiment_log_dir, "submitit_logs"))
    params = dict(timeout_min=int(60 * lc.get("timeout_hour", 24)), nodes=int(lc.num_nodes),
                  gpus_per_node=int(lc.num_gpus), tasks_per_node=int(lc.num_gpus),
                  cpus_per_task=int(lc.get("cpus_per_task", 10)), name=lc.get("job_name", "rsam"),
                  slurm_signal_delay_s=120)
    extra = {k: lc.get(k) for k in ("partition", "account", "qos") if lc.get(k)}
    params.update({f"slurm_{k}": v for k, v in extra.items()})
    if lc.get("mem_gb"):
        params["mem_gb"] = int(lc.mem_gb)
    executor.update_parameters(**params)
    OmegaConf.update(cfg, "launcher.master_port", random.Random().randint(20000, 60000), force_add=True)
    job = executor.submit(SubmititRunner(cfg))
    print(f"submitted SLURM job {job.job_id}; logs in {lc.experiment_log_dir}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="YAML config file, e.g. configs/rsam_b+_b.yaml")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs (processes) per node; 0 = CPU")
    parser.add_argument("--num-nodes", type=int, default=None, help="nodes (SLURM)")
    parser.add_argument("--use-cluster", type=int, choices=(0, 1), default=None, help="1: submit to SLURM")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--log-dir", default=None, help="experiment dir (default rsam_logs/<config name>)")
    parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="1,2,3",
                        help="one run per seed in <log dir>/seed<k> with trainer.seed=k (training/seed_sweep.py)")
    parser.add_argument("--print-optim-plan", action="store_true",
                        help="print every trainable parameter's lr / weight decay at progress 0..1 (JSON) and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=2 (anywhere among "
                        "the flags)")
    return parser.parse_intermixed_args(argv)


def print_optim_plan(cfg: DictConfig) -> None:
    """The optimizer's lr / wd plan as one JSON line: model built on the meta device, no data, no files."""
    import torch

    from rsam.config import instantiate
    from training.optimizer import OptimConfig, optim_plan
    from training.trainer import parse_section

    with torch.device("meta"):
        model = instantiate(cfg.model, "the config's model node")
    print(json.dumps(optim_plan(model, parse_section(OptimConfig, cfg.optim, "optim"))))


def main(argv=None) -> int:
    """Console entry point (``rsam-train``): 0 when training finished, 2 for a setup error (one line), 1 when
    the run failed, 75 (:data:`rsam.cli.STOPPED`) when it saved and stopped early (run it again to resume)."""
    return run_command("rsam-train", lambda: train_cli(argv))


def train_cli(argv=None) -> Optional[int]:
    """Everything ``main`` does; user errors raise :class:`rsam.errors.UserError`."""
    args = parse_args(argv)
    cfg = compose_config(args.config, args.overrides)
    if args.print_optim_plan:
        print_optim_plan(cfg)
        return None
    if args.seeds is not None:  # each seed is this command with its own --log-dir and trainer.seed
        base = apply_flags(copy.deepcopy(cfg), args).launcher.experiment_log_dir
        for seed_argv in seed_argvs(sys.argv[1:] if argv is None else argv, args.seeds, base):
            if train_cli(seed_argv) == STOPPED:
                return STOPPED
        return None
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and args.num_gpus is None:
        args.num_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cfg = apply_flags(cfg, args)
    log_dir = cfg.launcher.experiment_log_dir
    if int(os.environ.get("RANK", 0)) == 0:
        save_config(cfg, log_dir)

    if under_torchrun:
        return run_trainer(cfg)
    if cfg.launcher.use_cluster:
        launch_slurm(cfg)
        return None
    if int(cfg.launcher.num_nodes) != 1:
        raise UserError("--num-nodes > 1 needs --use-cluster 1 or torchrun")
    return launch_local(cfg)


if __name__ == "__main__":
    sys.exit(main())
