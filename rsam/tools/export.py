"""Convert a checkpoint into a pretrained directory (config.json, model.safetensors, vocab.txt, README.md).

    rsam-export --checkpoint rsam_logs/exp/checkpoints/best.pt --out rsam-b-plus/ --metrics eval_best_test/metrics.json
    rsam-export --checkpoint rsam_official.pt --config configs/rsam_b+_b_official.yaml --out rsam-official/ \\
        --vocab checkpoints/bert-base-uncased/vocab.txt
    rsam-export --checkpoint best.pt --out rsam-b-plus/ --push-to-hub user/rsam-b-plus

Our training checkpoints carry their config (model, tokenizer, recipe); official RSAM checkpoints need
--config (and --vocab when the config's tokenizer.vocab is not where it says). --metrics takes the
metrics.json of training/eval.py (or any flat JSON object of numbers); without it the card shows the
checkpoint's best validation result, if it has one. The directory loads with
``RSAMPredictor.from_pretrained(DIR)``, ``rsam-predict --checkpoint DIR`` and ``training/eval.py --checkpoint
DIR -c CONFIG``; --push-to-hub uploads it (``pip install "rsam[hub]"``, a Hub token).

Exit status: 0 on success, 2 for bad input (a one-line message names the file or setting).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from rsam.cli import run_command
from rsam.errors import UserError
from rsam.json_files import read_json_object

__all__ = ["main", "export"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsam-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="our checkpoint (best.pt), or an official one with --config")
    p.add_argument("--out", required=True, help="the pretrained directory to write")
    p.add_argument("--config", default=None, help="YAML config (required for official / bare checkpoints)")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (default: tokenizer.vocab of the config)")
    p.add_argument("--metrics", default=None, help="metrics JSON for the model card (training/eval.py metrics.json)")
    p.add_argument("--name", default=None, help="model card title (default: RSAM <directory name>)")
    p.add_argument("--license", default="apache-2.0", help="Hub licence id for the card (default apache-2.0)")
    p.add_argument("--data", default=None, help="a sentence on the training data (default: from the config)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of --config")
    return p.parse_args(argv)


class ExportError(UserError):
    """Bad input: printed as one line, exit status 2."""


def _read_metrics(path: str) -> dict:
    if not os.path.isfile(path):
        raise ExportError(f"--metrics {path}: file not found")
    try:
        data = read_json_object(path)
    except ValueError as exc:
        raise ExportError(f"--metrics {exc}") from None
    from rsam.model_card import normalise_metrics

    if not normalise_metrics(data)[0]:
        raise ExportError(f"--metrics {path}: no numbers in it (expected {{name: number}} or eval.py's metrics.json)")
    return data


def export(args: argparse.Namespace) -> str:
    """Everything ``main`` does -> the directory written."""
    import torch

    from rsam.build import build_from_checkpoint
    from rsam.checkpoint import read_checkpoint
    from rsam.data.tokenizer import tokenizer_from_config
    from rsam.pretrained import FILES, read_pretrained, save_pretrained

    if args.overrides and args.config is None:
        raise ExportError("overrides need --config")
    out = os.path.expanduser(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise ExportError(f"--out {out} exists and is not empty: pass --force to overwrite {', '.join(FILES)} in it")
    metrics = _read_metrics(args.metrics) if args.metrics else None

    ckpt = read_checkpoint(args.checkpoint)  # a checkpoint file, or a pretrained directory / Hub id to re-export
    model, cfg = build_from_checkpoint(ckpt, args.config, device="cpu", overrides=args.overrides)
    tokenizer = tokenizer_from_config(cfg, args.vocab, args.checkpoint)
    best = {k: v for k, v in (ckpt.extra.get("best") or {}).items() if k not in ("epoch", "step", "iteration")}
    if metrics is None and best:
        metrics = {"split": "val", "source": "best validation of the training run", "metrics": best}
    info = {"source_checkpoint": os.path.basename(os.path.abspath(args.checkpoint)),
            **{k: ckpt.extra[k] for k in ("epoch", "step") if isinstance(ckpt.extra.get(k), int)}}
    name = args.name or f"RSAM {os.path.basename(os.path.normpath(os.path.abspath(out)))}"
    card = {"name": name, "license": args.license, "data": args.data}
    if args.push_to_hub:
        card["repo_id"] = args.push_to_hub
    save_pretrained(model, cfg, out, tokenizer=tokenizer, metrics=metrics, info=info, card=card)

    # read it back: every tensor must come out as it went in
    written = read_pretrained(out).state_dict
    expected = model.state_dict()
    bad = [k for k in expected if k not in written or not torch.equal(written[k], expected[k].cpu())]
    if bad or set(written) != set(expected):
        raise RuntimeError(f"{out}: the written weights differ from the model's at {bad[:5]}")
    print(f"wrote {out}: {', '.join(FILES)} ({len(expected)} tensors, "
          f"{sum(t.numel() for t in expected.values()):,} values)")
    if args.push_to_hub:
        from rsam.pretrained import push_to_hub

        try:
            info = push_to_hub(out, args.push_to_hub, private=args.private or None)
        except Exception as exc:  # huggingface_hub's HTTP / auth errors: one line, the directory is written
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ExportError(f"{out} was written, but the upload to {args.push_to_hub} failed "
                              f"({type(exc).__name__}: {first})") from None
        print(f"uploaded to https://huggingface.co/{args.push_to_hub} ({getattr(info, 'commit_url', info)})")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``rsam-export``): 0 on success, 2 for bad input."""
    def body() -> None:
        args = parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        export(args)

    return run_command("rsam-export", body)


if __name__ == "__main__":
    sys.exit(main())
