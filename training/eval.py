"""Evaluate a checkpoint on a split: metrics table on stdout, metrics.json, optional masks and pictures.

    python training/eval.py -c configs/rsam_b+_b.yaml --checkpoint rsam_logs/exp/checkpoints/best.pt --split test
    python training/eval.py --checkpoint best.pt --num-gpus 4 --convention official --resolution original
    torchrun --nproc-per-node 8 training/eval.py --checkpoint best.pt
    python training/eval.py --checkpoint best.pt --num-gpus 0 --num-procs 2          # 2 CPU processes (gloo)
    python training/eval.py --checkpoint best.pt --save-vis 16 --save-predictions preds/
    python training/eval.py --rescore preds/                                         # no model, no GPU
    rsam-eval --checkpoint best.pt --split test                                      # the same, installed

Config: ``-c`` composes a YAML with the trailing Hydra overrides (e.g. ``scratch.val_batch_size=16``); without
``-c`` the config stored in the checkpoint is used, with the overrides applied to its resolved keys (e.g.
``data.test.dataset.root=/data/RISORS``; ``scratch.*`` no longer feeds anything there). The model node must fit
the weights; the data node ``data.<split>`` says what to read.

Processes: under torchrun (RANK / WORLD_SIZE set) this process joins that group. Otherwise ``--num-gpus N``
spawns N processes, one per GPU (``--num-gpus 1`` runs in this process); ``--num-gpus 0`` runs on the CPU,
``--num-procs K`` with K CPU processes over gloo. Images are sharded without padding, so every expression is
scored exactly once and 1 and k processes report the same numbers.

Outputs (``--out``, default ``<checkpoint folder>/eval_<checkpoint>_<split>_<convention>_<resolution>``):
``metrics.json`` (metrics + convention, resolution, split, timing); with ``--save-vis K`` the folder ``vis/``
with K TP/FP/FN pictures and overlays. ``--save-predictions DIR`` writes one PNG mask per expression and
``predictions.json`` (scores, expression, sample id); ``--rescore DIR`` recomputes the metrics from them.

Exit status: 0 on success, 2 for bad input (a one-line message names the file or setting), 1 otherwise.
The evaluation itself is :class:`rsam.evaluation.Evaluator`, the same engine the trainer validates with.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from typing import Any, Dict, Optional

from rsam.atomic_files import write_text_atomically
from rsam.cli import FAILED, USAGE, run_command
from rsam.errors import UserError

LOG = logging.getLogger("rsam.eval")


class EvalError(UserError):
    """A user-facing problem (bad path, config, checkpoint or data): printed as one message, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to evaluate (ours, or official with -c), or a pretrained directory (with -c)")
    p.add_argument("--split", default="test", help="data.<split> section of the config (default: test)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs (processes) on this node; 0 = CPU")
    p.add_argument("--num-procs", type=int, default=None,
                   help="processes to spawn (default: --num-gpus, 1 on the CPU); with --num-gpus 0: CPU processes")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (CPU runs)")
    p.add_argument("--convention", choices=("official", "standard"), default=None,
                   help="metric convention (default: trainer.metric_convention of the config, else standard)")
    p.add_argument("--resolution", choices=("network", "original"), default="network",
                   help="score at the network resolution (official) or at each image's original size")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: data.<split>.batch_size)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: data.<split>.num_workers)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast: auto = trainer.amp.enabled of the config on CUDA, off on the CPU")
    p.add_argument("--save-vis", type=int, default=0, metavar="K", help="write K error pictures + overlays")
    p.add_argument("--save-predictions", default=None, metavar="DIR", help="write PNG masks + predictions.json")
    p.add_argument("--rescore", default=None, metavar="DIR", help="recompute metrics from --save-predictions DIR")
    p.add_argument("--out", default=None, help="output folder for metrics.json and vis/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. scratch.val_batch_size=16")
    args = p.parse_intermixed_args(argv)
    if args.rescore is None and args.checkpoint is None:
        p.error("--checkpoint is required (or --rescore DIR)")
    if args.save_vis < 0:
        p.error("--save-vis must be >= 0")
    return args


# ------------------------------------------------------------------------------------------------------------
# config, model, data


def load_config(args: argparse.Namespace):
    """The composed config (``-c`` + overrides) or the checkpoint's stored one (+ overrides); a DictConfig.

    A stored config is data (:mod:`rsam.checkpoint.stored_config`): ``args.stored_config`` is set to the file it
    came from, and everything built from it is built from RSAM's own classes only (:func:`_instantiate`).
    """
    from omegaconf import OmegaConf

    from rsam.checkpoint import check_stored_config, read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    args.stored_config = None
    if args.config is not None:
        from rsam.config import compose_config

        cfg = compose_config(args.config, args.overrides)
        if ckpt.kind == "pretrained":
            # the directory's tokenizer is part of the model: the data pipeline must tokenise with it
            tokenizer = ckpt.config["tokenizer"]
            if cfg.get("tokenizer") is not None and OmegaConf.to_container(cfg.tokenizer, resolve=True) != tokenizer:
                LOG.info("tokenizer: %s of %s replaces the config's", tokenizer, args.checkpoint)
            OmegaConf.update(cfg, "tokenizer", tokenizer, merge=False, force_add=True)
        return cfg
    if ckpt.kind == "pretrained":
        raise EvalError(f"{args.checkpoint} is a pretrained directory: it holds the model and tokenizer but no data "
                        "section; pass -c CONFIG for the data to evaluate on")
    if ckpt.config is None:
        raise EvalError(f"{args.checkpoint} holds no config (official or bare state dict): pass -c CONFIG")
    model_overrides = [o for o in args.overrides if o.lstrip("+").startswith("model.")]
    if model_overrides:
        raise EvalError(f"{model_overrides}: the model of {args.checkpoint} is built as stored; to change it, "
                        "pass -c CONFIG")
    stale = [o for o in args.overrides if o.lstrip("+").startswith("scratch.")]
    if stale:
        # The stored config is resolved: nothing refers to scratch.* any more, so such overrides change nothing.
        print(f"warning: {stale} change nothing in the checkpoint's stored (resolved) config; override the keys "
              "that use them (e.g. data.test.batch_size=16, or --batch-size) or pass -c CONFIG", file=sys.stderr)
    cfg = OmegaConf.create(ckpt.config)
    if args.overrides:
        try:
            # Hydra's "+key=value" / "++key=value" (add / force-add) are plain assignments here
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in args.overrides]))
        except Exception as exc:  # omegaconf raises several types, all with readable messages
            raise EvalError(f"cannot apply overrides {args.overrides}: {exc}") from None
        check_stored_config(OmegaConf.to_container(cfg), f"{args.checkpoint} with overrides {args.overrides}",
                            "config")
    args.stored_config = ckpt.source
    return cfg


def _instantiate(node, what: str, key: str, stored_in: Optional[str]):
    """Build a config node: with Hydra for a config the user passed, as data (RSAM's classes only) for one
    stored in ``stored_in``."""
    if stored_in is None:
        from rsam.config import instantiate

        return instantiate(node, what)
    from rsam.checkpoint import build_stored

    return build_stored(_plain(node), stored_in, key)


def split_section(cfg, split: str):
    """``data.<split>``; a dotted name (``val.rrsisd``) picks one dataset of a multi-dataset section."""
    node, path = cfg.get("data") or {}, "data"
    for part in split.split("."):
        if node.get(part) is None:
            raise EvalError(f"the config has no {path}.{part} section (has: {sorted(node)})")
        node, path = node[part], f"{path}.{part}"
    if "dataset" not in node:
        raise EvalError(f"{path} holds several datasets: pick one with --split {split}.<name> "
                        f"(one of {sorted(node)})")
    return node


def build_dataset(cfg, split: str, stored_in: Optional[str] = None):
    section = split_section(cfg, split)
    dataset = _instantiate(section.dataset, f"the {split} dataset (data.{split}.dataset)",
                           f"config.data.{split}.dataset", stored_in)
    if len(dataset) == 0:
        raise EvalError(f"the {split} split has zero images ({getattr(dataset, 'root', '?')})")
    return dataset


def image_loader(dataset):
    """name -> original image, uint8 (H, W, 3), through the dataset's reader."""
    import numpy as np

    def load(name: str):
        return np.asarray(dataset.reader.decode_image(name, dataset.reader.open_image(name)))

    return load


# ------------------------------------------------------------------------------------------------------------
# one evaluation process


def run(cfg, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Evaluate in this process (a rank of the group when distributed); returns the metrics.json dict on rank 0."""
    import torch

    from rsam import distributed as D
    from rsam.build import build_from_checkpoint
    from rsam.evaluation import Evaluator
    from rsam.evaluation.per_expression import dataset_label
    from rsam.evaluation.writers import PredictionWriter, VisualWriter

    accelerator = cfg.trainer.get("accelerator", "cuda") if cfg.get("trainer") else "cuda"
    if args.num_gpus == 0:
        accelerator = "cpu"
    info = D.init_distributed(accelerator)
    threads_before = torch.get_num_threads()
    try:
        if info.device.type == "cpu":
            threads = args.threads or max(1, (os.cpu_count() or 1) // max(info.world_size, 1))
            torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank {info.rank}] %(levelname)s %(message)s")
        stored_in = args.stored_config
        # a stored config builds its own model (as data); a config passed with -c builds through Hydra
        model, _ = build_from_checkpoint(args.checkpoint, None if stored_in else cfg, device=info.device)
        model.requires_grad_(False)

        section = split_section(cfg, args.split)
        dataset = build_dataset(cfg, args.split, stored_in)
        collate = _instantiate(section.collate, f"the {args.split} collate (data.{args.split}.collate)",
                               f"config.data.{args.split}.collate", stored_in)
        amp = args.amp == "on" or (args.amp == "auto" and info.device.type == "cuda"
                                   and bool(cfg.get("trainer", {}).get("amp", {}).get("enabled", False)))
        evaluator = Evaluator(
            dataset, collate, batch_size=args.batch_size or int(section.get("batch_size", 1)),
            num_workers=args.num_workers if args.num_workers is not None else int(section.get("num_workers", 0)),
            convention=args.convention or _config_convention(cfg), resolution=args.resolution,
            amp_dtype=torch.bfloat16 if amp else None, progress=not args.no_progress, name=args.split,
            rank=info.rank, world_size=info.world_size, persistent_workers=False)
        convention = evaluator.convention
        out_dir = args.out or default_out_dir(args, convention.name)
        callbacks = []
        writer = None
        meta = {"checkpoint": os.path.abspath(args.checkpoint), "split": args.split, "convention": convention.name,
                "resolution": args.resolution, "image_size": int(model.image_size),
                "dataset": _plain(section.dataset), "benchmark": dataset_label(args.split.partition(".")[2], dataset)}
        if args.save_predictions:
            writer = PredictionWriter(args.save_predictions, meta)
            callbacks.append(writer)
        if args.save_vis and info.is_main:
            callbacks.append(VisualWriter(os.path.join(out_dir, "vis"), args.save_vis, image_loader(dataset)))

        LOG.info("evaluating %s on %s (%d images) with %d process(es) on %s, %s convention, %s resolution%s",
                 args.checkpoint, args.split, len(dataset), info.world_size, info.device, convention.name,
                 args.resolution, ", bf16 autocast" if amp else "")
        result = evaluator.run(model, callbacks=callbacks, device=info.device)
        if writer is not None:
            writer.close(result.metrics)
        per_process = D.all_gather_object(result.local_expressions)  # shows that nothing was scored twice
        record = _report(result, per_process, meta, convention, out_dir, model, args, info) if info.is_main else None
        # An ordered end, as in the trainer (training/trainer.py close): every rank leaves the group together,
        # after rank 0 has written its results. Without it rank 1 tore its gloo group down and exited while
        # rank 0 was still writing, and once aborted on the way out ("terminate called without an active
        # exception", test_eval.py::test_one_and_two_processes_identical in CI).
        D.barrier()
        return record
    finally:
        torch.set_num_threads(threads_before)
        D.destroy_distributed()


def _report(result, per_process, meta, convention, out_dir: str, model, args: argparse.Namespace,
            info) -> Dict[str, Any]:
    """Rank 0: write metrics.json into ``out_dir``, print the summary; returns the record."""
    from rsam.evaluation.metrics import format_metrics
    from rsam.evaluation.per_expression import write_per_expression
    from rsam.stats.records import PER_EXPRESSION_JSONL

    record = {**{k: v for k, v in meta.items() if k != "dataset"},
              "convention_description": convention.describe(), "num_processes": info.world_size,
              "expressions_per_process": per_process,
              "seconds": result.seconds, "expressions_per_s": result.expressions_per_s,
              "metrics": result.metrics}
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, "metrics.json"), json.dumps(record, indent=1))
    # every expression's intersection / union, what the metrics are computed from (rsam-compare reads it)
    write_per_expression(os.path.join(out_dir, PER_EXPRESSION_JSONL), {meta["benchmark"]: result.expressions},
                         convention.name, args.resolution)
    size = f"{model.image_size}x{model.image_size}" if args.resolution == "network" else "original image size"
    print(f"\n{args.checkpoint} on split '{args.split}': {result.metrics['num_expressions']} expressions, "
          f"scored at {size}, {info.world_size} process(es), {result.seconds:.1f} s "
          f"({result.expressions_per_s:.1f} expr/s)")
    print(format_metrics(result.metrics, convention))
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}, {PER_EXPRESSION_JSONL}"
          + (f" and {args.save_vis} pictures in {os.path.join(out_dir, 'vis')}" if args.save_vis else "")
          + (f"; predictions in {args.save_predictions}" if args.save_predictions else ""))
    return record


def _config_convention(cfg) -> str:
    from rsam.evaluation.metrics import DEFAULT_CONVENTION

    trainer = cfg.get("trainer") or {}
    return trainer.get("metric_convention") or DEFAULT_CONVENTION


def _plain(node) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def default_out_dir(args: argparse.Namespace, convention: str) -> str:
    path = os.path.normpath(os.path.abspath(args.checkpoint))  # "dir/" of a pretrained directory -> "dir"
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    return os.path.join(folder, f"eval_{stem}_{args.split}_{convention}_{args.resolution}")


def rescore_main(args: argparse.Namespace) -> Dict[str, Any]:
    """``--rescore DIR``: metrics from written masks, against the dataset recorded in predictions.json."""
    from rsam.config import compose_config
    from rsam.json_files import read_json_object
    from rsam.evaluation.metrics import DEFAULT_CONVENTION, MetricConvention, format_metrics
    from rsam.evaluation.rescore import rescore
    from rsam.evaluation.writers import PREDICTIONS_JSON

    path = os.path.join(args.rescore, PREDICTIONS_JSON)
    if not os.path.isfile(path):
        raise EvalError(f"{path} not found: --rescore needs a folder written by --save-predictions")
    meta = read_json_object(path)
    if args.config is not None:  # the config's split, e.g. a dataset that moved
        dataset = build_dataset(compose_config(args.config, args.overrides), meta.get("split", args.split))
    else:  # recorded by eval.py, but a file like any other: built as data
        dataset = _instantiate(meta.get("dataset"), f"the dataset recorded in {path}", "dataset", path)
    convention = MetricConvention.get(args.convention or meta.get("convention", DEFAULT_CONVENTION))
    metrics = rescore(args.rescore, dataset, convention)
    record = {"predictions": os.path.abspath(args.rescore), "split": meta.get("split"),
              "convention": convention.name, "convention_description": convention.describe(),
              "resolution": meta.get("resolution"), "metrics": metrics}
    out_dir = args.out or args.rescore
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, "metrics_rescored.json"), json.dumps(record, indent=1))
    print(f"\nrescored {args.rescore} ({metrics['num_expressions']} expressions, {meta.get('resolution')} resolution)")
    print(format_metrics(metrics, convention))
    print(f"wrote {os.path.join(out_dir, 'metrics_rescored.json')}")
    return record


# ------------------------------------------------------------------------------------------------------------
# launching


def _spawned(local_rank: int, cfg_container: dict, args: argparse.Namespace, world_size: int, port: int) -> None:
    from omegaconf import OmegaConf

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    status = run_command("rsam-eval", lambda: run(OmegaConf.create(cfg_container), args) and None)
    if status:
        sys.exit(status)


def evaluate_cli(argv=None) -> Optional[Dict[str, Any]]:
    """Everything ``main`` does; returns the metrics.json (or metrics_rescored.json) record. User errors raise
    :class:`rsam.errors.UserError`; a spawned process that failed raises ``SystemExit`` with its status."""
    args = parse_args(argv)
    if args.rescore is not None:
        return rescore_main(args)
    cfg = load_config(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM launcher
        return run(cfg, args)
    if args.num_gpus is None:
        args.num_gpus = 1
    nprocs = args.num_procs if args.num_procs is not None else max(1, args.num_gpus)
    if nprocs < 1:
        raise EvalError("--num-procs must be >= 1")
    if nprocs == 1:
        return run(cfg, args)

    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    port = random.Random().randint(20000, 60000)
    container = OmegaConf.to_container(cfg, resolve=False)
    try:
        mp.start_processes(_spawned, args=(container, args, nprocs, port), nprocs=nprocs, start_method="spawn")
    except mp.ProcessExitedException as exc:
        print(f"rsam-eval: evaluation failed: process {exc.error_index} exited with code {exc.exit_code} "
              "(its message is above)", file=sys.stderr)
        raise SystemExit(USAGE if exc.exit_code == USAGE else FAILED) from None
    out_dir = args.out or default_out_dir(args, args.convention or _config_convention(cfg))
    with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    """Console entry point (``rsam-eval``): 0 on success, 2 for bad input, 1 for a failed run."""
    return run_command("rsam-eval", lambda: evaluate_cli(argv) and None)


if __name__ == "__main__":
    sys.exit(main())
