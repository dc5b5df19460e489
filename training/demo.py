"""Offline demo: RSAM learns to read referring expressions on CPU in a few minutes, no download needed.

    make demo                      # = pip install -e . && python training/demo.py
    python training/demo.py --out demo_output [--num-images 1200] [--seed 0] [Hydra overrides ...]
    python training/demo.py --text-blind-control    # also train a model on shuffled expressions (+5 min)

Steps, each with the project's own tools (the same ones the 800 px recipe uses):

1. ``python -m rsam.data.synthetic``: a synthetic RISORS-format dataset (aerial-like scenes with 3-4 objects
   of which several share a category or colour, one referring expression per object) in ``<out>/data``;
2. a WordPiece vocabulary trained on the training expressions with Hugging Face ``tokenizers``, saved as a
   BERT tokenizer folder ``<out>/text_encoder`` (``vocab.txt``, ``tokenizer_config.json``, ``config.json`` of
   the small random BERT the model builds);
3. ``training/train.py -c configs/rsam_demo_cpu.yaml --num-gpus 0``: RSAM from scratch (128 px, 6-block Hiera,
   2-layer BERT), checkpoints in ``<out>/run/checkpoints``;
4. ``training/eval.py`` on the test split -> ``<out>/eval/metrics.json`` and error pictures in ``<out>/eval/vis``;
5. the text-shuffled control: the same checkpoint evaluated on the test split with every expression moved to
   another image's object (``<out>/data_text_shuffled``). A model that reads the expressions collapses here;
   ``rsam-compare`` pairs the two evaluations expression by expression (intervals, p-values; also in
   ``<out>/compare_text_shuffled.txt``);
6. overlays of predictions with their expressions for a few test images (``rsam.predictor`` +
   ``rsam-predict``'s writer) in ``<out>/overlays``.

The last line printed is one JSON object: test mIoU / oIoU / Pr@0.5, the text-shuffled mIoU and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(REPO, "configs", "rsam_demo_cpu.yaml")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4; [PAD] = 0 as BERT's pad id


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


# ------------------------------------------------------------------------------------------------ helpers
def say(msg: str) -> None:
    print(msg, flush=True)


def run_step(cmd: Sequence[str], what: str, log_path: Optional[str] = None, quiet: bool = False) -> None:
    """Run a project command; its output streams to the terminal (and to ``log_path``)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    say("  $ " + " ".join(_short(c) for c in cmd))
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    try:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        tail: List[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if log:
                log.write(line)
            tail = (tail + [line])[-40:]
            if not quiet:
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    finally:
        if log:
            log.close()
    if code != 0:
        where = f" (log: {log_path})" if log_path else ""
        raise DemoError(f"{what} failed with exit code {code}{where}; last lines:\n" + "".join(tail[-15:]))


def _short(arg: str) -> str:
    """Paths under the repository are shown relative to it."""
    if os.path.isabs(arg) and arg.startswith(REPO + os.sep):
        return os.path.relpath(arg, REPO)
    return arg


def read_split(root: str, split: str) -> List[str]:
    with open(os.path.join(root, f"RISORS_{split}.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_annotations(root: str, name: str) -> dict:
    with open(os.path.join(root, "Annotations", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ step 1
def make_dataset(root: str, num_images: int, size: int, seed: int, min_objects: int, max_objects: int,
                 min_frac: float, max_frac: float) -> None:
    params = {"num_images": num_images, "size": size, "seed": seed, "min_objects": min_objects,
              "max_objects": max_objects, "min_object_frac": min_frac, "max_object_frac": max_frac}
    stamp = os.path.join(root, "demo_params.json")
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == params:
                say(f"  reusing {_short(root)} (same parameters)")
                return
    if os.path.isdir(root):
        shutil.rmtree(root)
    run_step([sys.executable, "-m", "rsam.data.synthetic", "--out", root, "--num-images", str(num_images),
              "--size", str(size), "--seed", str(seed), "--min-objects", str(min_objects),
              "--max-objects", str(max_objects), "--min-object-frac", str(min_frac),
              "--max-object-frac", str(max_frac)], "dataset generation")
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(params, f)


# ------------------------------------------------------------------------------------------------ step 2
def train_vocabulary(root: str, out_dir: str, vocab_size: int, bert_config: Dict) -> str:
    """WordPiece vocabulary of the training expressions, padded with [unusedK] to exactly ``vocab_size``
    entries (the size of the BERT embedding table in the config), saved as a BERT tokenizer folder."""
    from tokenizers import BertWordPieceTokenizer

    texts = [a["description"] for n in read_split(root, "train") for a in read_annotations(root, n)["annotations"]]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    vocab = sorted(wordpiece.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise DemoError(f"unexpected special tokens in the trained vocabulary: {tokens[:5]}")
    if len(tokens) > vocab_size:
        raise DemoError(f"the trained vocabulary has {len(tokens)} entries > scratch.text_vocab_size={vocab_size}")
    learned = len(tokens)
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    os.makedirs(out_dir, exist_ok=True)
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in tokens))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length":
                   int(bert_config.get("max_position_embeddings", 512))}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": "bert", "architectures": ["BertModel"], **bert_config}, f, indent=1)
    say(f"  {learned} word pieces learned from {len(texts)} training expressions (+{vocab_size - learned} "
        f"unused slots) -> {_short(vocab_file)}")
    return vocab_file


# ------------------------------------------------------------------------------------------------ step 5
def shuffled_copy(root: str, out: str, split: str, seed: int) -> int:
    """A copy of ``split`` whose expressions are permuted across the split's records (masks stay put), so
    that no record keeps its own expression. Images are linked, not copied. Returns the record count."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "Annotations"))
    src_images = os.path.join(root, "JPEGImages")
    try:
        os.symlink(os.path.abspath(src_images), os.path.join(out, "JPEGImages"), target_is_directory=True)
    except OSError:  # no symlinks (some Windows setups): copy
        shutil.copytree(src_images, os.path.join(out, "JPEGImages"))
    names = read_split(root, split)
    files = {n: read_annotations(root, n) for n in names}
    slots = [(n, i) for n in names for i in range(len(files[n]["annotations"]))]
    texts = [files[n]["annotations"][i]["description"] for n, i in slots]
    rng = random.Random(seed)
    order = list(range(len(slots)))
    rng.shuffle(order)
    # A random permutation leaves ~1 fixed point; rotate those away so every record gets another's text.
    fixed = [k for k in range(len(order)) if order[k] == k]
    for a, b in zip(fixed, fixed[1:] + fixed[:1]):
        if a != b:
            order[a], order[b] = order[b], order[a]
    for (n, i), k in zip(slots, order):
        files[n]["annotations"][i]["description"] = texts[k]
    for n, data in files.items():
        with open(os.path.join(out, "Annotations", f"{n}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
    for s in ("train", "val", "test"):
        with open(os.path.join(out, f"RISORS_{s}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in (names if s == split else [])))
    return len(slots)


# ------------------------------------------------------------------------------------------------ step 6
def write_overlays(checkpoint: str, root: str, out_dir: str, count: int, overrides: Sequence[str]) -> List[str]:
    """Predict every expression of the first ``count`` test images and draw them with their captions."""
    from rsam.predictor import RSAMPredictor
    from rsam.tools.predict import write_outputs

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    predictor = RSAMPredictor.from_checkpoint(checkpoint, config=CONFIG, device="cpu", overrides=overrides)
    written = []
    for name in read_split(root, "test")[:count]:
        path = os.path.join(root, "JPEGImages", f"{name}.jpg")
        texts = [a["description"] for a in read_annotations(root, name)["annotations"]]
        predictor.set_image(path)
        record = write_outputs(predictor, predictor.predict(texts), path, out_dir)
        written.append(os.path.join(out_dir, record["overlay"]))
    return written


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "demo_output"), help="output folder (default demo_output/)")
    p.add_argument("--num-images", type=int, default=1500, help="synthetic images (80%% train, 10%% val, 10%% test)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--min-object-frac", type=float, default=0.25, help="smallest object extent / image side")
    p.add_argument("--max-object-frac", type=float, default=0.42, help="largest object extent / image side")
    p.add_argument("--overlays", type=int, default=6, help="test images drawn with their predictions")
    p.add_argument("--save-vis", type=int, default=8, help="error pictures written by training/eval.py")
    p.add_argument("--no-control", action="store_true", help="skip the text-shuffled evaluation")
    p.add_argument("--text-blind-control", action="store_true",
                   help="also train a second model on expressions shuffled across the training images and "
                        "evaluate it on the real test split (doubles the training time)")
    p.add_argument("--quiet", action="store_true", help="do not stream the training/eval output (logs only)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for configs/rsam_demo_cpu.yaml, "
                                                "e.g. scratch.num_epochs=2")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    data_root = os.path.join(out, "data")
    text_dir = os.path.join(out, "text_encoder")
    run_dir = os.path.join(out, "run")
    os.makedirs(out, exist_ok=True)

    from omegaconf import OmegaConf

    from rsam.config import compose_config

    # Paths first, user overrides last (they win).
    base_overrides = [f"scratch.data_root={data_root}", f"scratch.vocab={os.path.join(text_dir, 'vocab.txt')}"]
    overrides = base_overrides + list(args.overrides)
    cfg = compose_config(CONFIG, overrides)
    resolution = int(cfg.scratch.resolution)
    epochs = int(cfg.scratch.num_epochs)
    vocab_size = int(cfg.scratch.text_vocab_size)
    bert_config = OmegaConf.to_container(cfg.model.text_encoder, resolve=True)
    bert_config.pop("_target_", None)
    timings: Dict[str, float] = {}

    def stage(k: int, title: str) -> float:
        say(f"\n[{k}/6] {title}")
        return time.perf_counter()

    t = stage(1, f"synthetic RISORS-format dataset: {args.num_images} images at {resolution} px")
    make_dataset(data_root, args.num_images, resolution, args.seed, args.min_objects, args.max_objects,
                 args.min_object_frac, args.max_object_frac)
    timings["data_s"] = time.perf_counter() - t

    t = stage(2, "text encoder vocabulary (WordPiece on the training expressions)")
    train_vocabulary(data_root, text_dir, vocab_size, bert_config)
    timings["vocab_s"] = time.perf_counter() - t

    t = stage(3, f"training RSAM from scratch on the CPU ({epochs} epochs), training/train.py")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # otherwise train.py would resume the previous demo run
    train_cmd = [sys.executable, os.path.join(REPO, "training", "train.py"), "-c", CONFIG, "--num-gpus", "0",
                 "--log-dir", run_dir]
    run_step(train_cmd + overrides, "training", os.path.join(out, "train.log"), quiet=args.quiet)
    timings["train_s"] = time.perf_counter() - t
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    checkpoint = os.path.join(ckpt_dir, "best.pt")
    if not os.path.isfile(checkpoint):
        checkpoint = os.path.join(ckpt_dir, "checkpoint.pt")
    if not os.path.isfile(checkpoint):
        raise DemoError(f"training finished without a checkpoint in {ckpt_dir}")

    t = stage(4, "evaluation on the synthetic test split, training/eval.py")
    eval_dir = os.path.join(out, "eval")
    eval_cmd = [sys.executable, os.path.join(REPO, "training", "eval.py"), "-c", CONFIG, "--checkpoint", checkpoint,
                "--split", "test", "--num-gpus", "0", "--no-progress"]
    run_step(eval_cmd + ["--out", eval_dir, "--save-vis", str(args.save_vis)] + overrides, "evaluation",
             os.path.join(out, "eval.log"), quiet=args.quiet)
    metrics = _read_metrics(eval_dir)
    timings["eval_s"] = time.perf_counter() - t

    shuffled: Optional[dict] = None
    t = stage(5, "text-shuffled control: the same model, every test expression moved to another object")
    if args.no_control:
        say("  skipped (--no-control)")
    else:
        shuffled_root = os.path.join(out, "data_text_shuffled")
        n = shuffled_copy(data_root, shuffled_root, "test", seed=args.seed + 1)
        say(f"  {n} test expressions permuted -> {_short(shuffled_root)}")
        shuffled_dir = os.path.join(out, "eval_text_shuffled")
        run_step(eval_cmd + ["--out", shuffled_dir] + overrides + [f"data.test.dataset.root={shuffled_root}"],
                 "text-shuffled evaluation", os.path.join(out, "eval_text_shuffled.log"), quiet=True)
        shuffled = _read_metrics(shuffled_dir)
        say(f"  mIoU with the right expressions {metrics['mIoU']:.3f}, with shuffled ones {shuffled['mIoU']:.3f}")
        say("  paired comparison, A = the real expressions, B = shuffled ones (rsam-compare):")
        run_step([sys.executable, "-m", "rsam.tools.compare", eval_dir, shuffled_dir], "rsam-compare",
                 os.path.join(out, "compare_text_shuffled.txt"))
    timings["control_s"] = time.perf_counter() - t

    blind: Optional[dict] = None
    if args.text_blind_control:
        t = time.perf_counter()
        say("\n[extra] text-blind control: a second model trained on shuffled training expressions")
        blind_root = os.path.join(out, "data_text_blind")
        shuffled_copy(data_root, blind_root, "train", seed=args.seed + 2)
        for split in ("val", "test"):  # validate and test on the real expressions
            shutil.copyfile(os.path.join(data_root, f"RISORS_{split}.txt"), os.path.join(blind_root, f"RISORS_{split}.txt"))
            for name in read_split(data_root, split):
                shutil.copyfile(os.path.join(data_root, "Annotations", f"{name}.json"),
                                os.path.join(blind_root, "Annotations", f"{name}.json"))
        blind_run = os.path.join(out, "run_text_blind")
        if os.path.isdir(blind_run):
            shutil.rmtree(blind_run)
        run_step([sys.executable, os.path.join(REPO, "training", "train.py"), "-c", CONFIG, "--num-gpus", "0",
                  "--log-dir", blind_run] + overrides + [f"scratch.data_root={blind_root}"],
                 "text-blind training", os.path.join(out, "train_text_blind.log"), quiet=args.quiet)
        blind_ckpt = os.path.join(blind_run, "checkpoints", "best.pt")
        if not os.path.isfile(blind_ckpt):
            blind_ckpt = os.path.join(blind_run, "checkpoints", "checkpoint.pt")
        blind_dir = os.path.join(out, "eval_text_blind")
        run_step([c if c != checkpoint else blind_ckpt for c in eval_cmd] + ["--out", blind_dir] + overrides,
                 "text-blind evaluation", os.path.join(out, "eval_text_blind.log"), quiet=True)
        blind = _read_metrics(blind_dir)
        timings["text_blind_s"] = time.perf_counter() - t

    t = stage(6, "overlays of predictions with their expressions (rsam.predictor)")
    overlay_dir = os.path.join(out, "overlays")
    overlays = write_overlays(checkpoint, data_root, overlay_dir, args.overlays, overrides) if args.overlays else []
    timings["overlays_s"] = time.perf_counter() - t

    wall = time.perf_counter() - start
    vis_dir = os.path.join(eval_dir, "vis")
    say("\nDone. Where everything went:")
    for label, path in (("dataset", data_root), ("text encoder vocabulary", text_dir),
                        ("training run (config, logs, TensorBoard)", run_dir), ("checkpoint", checkpoint),
                        ("test metrics", os.path.join(eval_dir, "metrics.json")),
                        ("eval error pictures", vis_dir if os.path.isdir(vis_dir) else None),
                        ("overlays", overlay_dir if overlays else None)):
        if path:
            say(f"  {label:<42} {path}")
    say(f"  test split: mIoU {metrics['mIoU']:.3f}  oIoU {metrics['oIoU']:.3f}  Pr@0.5 {metrics['Pr@0.5']:.3f}  "
        f"({metrics.get('num_expressions', '?')} expressions)" +
        (f"; with shuffled expressions mIoU {shuffled['mIoU']:.3f}" if shuffled else ""))
    say(f"  wall time {wall:.0f} s (training {timings['train_s']:.0f} s)")

    result = {
        "mIoU": round(float(metrics["mIoU"]), 4),
        "oIoU": round(float(metrics["oIoU"]), 4),
        "Pr@0.5": round(float(metrics["Pr@0.5"]), 4),
        "num_expressions": metrics.get("num_expressions"),
        "text_shuffled_mIoU": round(float(shuffled["mIoU"]), 4) if shuffled else None,
        "wall_time_s": round(wall, 1),
        "train_time_s": round(timings["train_s"], 1),
        "resolution": resolution,
        "epochs": epochs,
        "out": out,
    }
    if blind is not None:
        result["text_blind_training_mIoU"] = round(float(blind["mIoU"]), 4)
    print(json.dumps(result), flush=True)
    return result


def _read_metrics(eval_dir: str) -> dict:
    path = os.path.join(eval_dir, "metrics.json")
    if not os.path.isfile(path):
        raise DemoError(f"evaluation wrote no {path}")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    metrics = record.get("metrics", record)
    for key in ("mIoU", "oIoU", "Pr@0.5"):
        if key not in metrics:
            raise DemoError(f"{path} has no '{key}' (keys: {sorted(metrics)[:12]})")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        sys.exit(1)
