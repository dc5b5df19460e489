"""Data-pipeline throughput per dataloader worker on 800 px samples of any dataset format.

    python -m benchmarks.bench_data [--format rrsisd] [--num-images 48] [--resolution 800] [--iters 96]
    python -m benchmarks.bench_data --data-root DIR --format risbench [--split train]  # time your own data
    python -m benchmarks.bench_data --open-expressions 20000 [--format rrsisd]   # time to open a large dataset

Generates a temporary synthetic dataset at 800 px in the ``--format`` layout (risors, rrsisd, refsegrs,
risbench, jsonl), or reads the dataset at ``--data-root``, then times a DataLoader
with ``--workers`` workers (default 1: the per-worker rate including the hand-over to the main process) doing the
full per-sample work: JPEG decode, RLE decode of the selected masks, resize, black-box augmentation, negatives,
tokenisation and collation into a Batch (uint8 images; the model normalises them). Prints one JSON line: ``samples_per_s_per_worker`` is the
wall-clock rate; ``cpu_samples_per_s_per_worker`` divides by the CPU time actually spent, which is the number to
trust on a machine shared with other jobs (see ``load_average_1min``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from rsam.data.batch import Collator
from rsam.data.dataset import ReferringDataset
from rsam.data.errors import DataError
from rsam.data.synthetic import generate
from rsam.data.tokenizer import RSAMTokenizer

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference",
                             "bert-base-uncased-vocab.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--size", type=int, default=800, help="side of the generated images")
    p.add_argument("--resolution", type=int, default=800, help="network resolution")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=96, help="samples timed")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="dataloader workers (0: in this process)")
    p.add_argument("--negative-ratio", type=float, default=1.0)
    p.add_argument("--vocab", default=DEFAULT_VOCAB)
    p.add_argument("--format", default="risors", choices=("risors", "rrsisd", "refsegrs", "risbench", "jsonl"))
    p.add_argument("--data-root", help="time this dataset (in the --format layout) instead of a synthetic one")
    p.add_argument("--split", default="train", help="with --data-root: the split to read")
    p.add_argument("--open-expressions", type=int, default=0, metavar="N",
                   help="instead: time opening an N-expression dataset and reading its first sample, "
                        "the first time and again (with the cache)")
    args = p.parse_args()
    torch.set_num_threads(1)  # a dataloader worker runs single-threaded
    if args.open_expressions:
        return time_open(args)

    with tempfile.TemporaryDirectory() as scratch:
        root, split, gen_s = args.data_root, args.split, 0.0
        if root is None:
            t0 = time.perf_counter()
            root, split = scratch, "train"
            generate(root, args.num_images, args.size, seed=0, val_fraction=0.0, test_fraction=0.0,
                     format=args.format)
            gen_s = time.perf_counter() - t0
        try:
            dataset = ReferringDataset(root, split, resolution=args.resolution, negative_ratio=args.negative_ratio,
                                       format=args.format)
        except DataError as e:
            sys.exit(f"bench_data.py: {e}")
        collate = Collator(RSAMTokenizer(args.vocab, "official"), max_expressions_per_batch=24)

        # (index, epoch) pairs, as the training sampler yields them; the dataset is cycled.
        # The timer starts when the last warm-up batch arrives: one more batch than the timed ones.
        total = args.batch_size * (args.warmup_batches + 1 + -(-args.iters // args.batch_size))
        order = [(i % len(dataset), 0) for i in range(total)]
        loader = DataLoader(
            dataset, batch_size=args.batch_size, sampler=order, num_workers=args.workers, collate_fn=collate,
            prefetch_factor=4 if args.workers > 0 else None,
        )
        n = expressions = 0
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        for b, batch in enumerate(loader):
            if b == args.warmup_batches:  # worker start-up and first-touch costs excluded
                t0, cpu0 = time.perf_counter(), time.process_time()
            elif b > args.warmup_batches:
                n += batch.num_images
                expressions += batch.num_expressions
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        del loader  # joins the workers, so their CPU time shows up in RUSAGE_CHILDREN
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if args.workers > 0:  # CPU seconds per sample of the workers, warm-up batches included
            worker_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
            cpu_rate = total / worker_cpu / args.workers
        else:
            cpu_rate = n / cpu
    print(
        json.dumps(
            {
                "benchmark": "data",
                "format": args.format,
                "samples_per_s_per_worker": round(n / elapsed / max(args.workers, 1), 1),
                "cpu_samples_per_s_per_worker": round(cpu_rate, 1),
                "workers": args.workers,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "ms_per_sample_per_worker": round(1000 * elapsed * max(args.workers, 1) / n, 2),
                "expressions_per_sample": round(expressions / n, 2),
                "data_root": args.data_root,
                "image_size": args.size if args.data_root is None else None,
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "samples": n,
                "negative_ratio": args.negative_ratio,
                "generate_s": round(gen_s, 1),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def time_open(args) -> None:
    """Open an ``--open-expressions``-expression dataset twice in fresh processes' conditions: the first time
    (empty cache: pickle read and index built) and the second time (cache filled)."""
    with tempfile.TemporaryDirectory() as root:
        os.environ["RSAM_CACHE_DIR"] = os.path.join(root, "cache")
        data = os.path.join(root, "data")
        per_image = 3 * 4.3  # three expressions per object, about 4.3 objects per image
        images = max(1, int(round(args.open_expressions / per_image)))
        t0 = time.perf_counter()
        generate(data, images, 32, seed=0, expressions_per_object=3, format=args.format, write_vocabulary=False)
        gen_s = time.perf_counter() - t0
        times, count = [], 0
        for _ in range(2):
            t0 = time.perf_counter()
            datasets = [ReferringDataset(data, split, format=args.format, training=split == "train",
                                         resolution=32) for split in ("train", "val", "test")]
            datasets[0][(0, 0)]
            times.append(time.perf_counter() - t0)
            count = sum(len(r.load_annotations(n)) for d in datasets for r in [d.reader] for n in d.names)
    print(json.dumps({"benchmark": "data_open", "format": args.format, "expressions": count, "images": images,
                      "open_and_first_sample_s": round(times[0], 2), "again_with_cache_s": round(times[1], 2),
                      "generate_s": round(gen_s, 1)}))


if __name__ == "__main__":
    main()
