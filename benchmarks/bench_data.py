"""Data-pipeline throughput per dataloader worker on 800 px RISORS-format samples.

    python benchmarks/bench_data.py [--num-images 48] [--resolution 800] [--batch-size 8] [--iters 96]

Generates a temporary synthetic RISORS-format dataset at 800 px (what RISORS images are), then times a DataLoader
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
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from rsam.data.batch import Collator
from rsam.data.dataset import RISORSDataset
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
    args = p.parse_args()
    torch.set_num_threads(1)  # a dataloader worker runs single-threaded

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        generate(root, args.num_images, args.size, seed=0, val_fraction=0.0, test_fraction=0.0)
        gen_s = time.perf_counter() - t0
        dataset = RISORSDataset(root, "train", resolution=args.resolution, negative_ratio=args.negative_ratio)
        collate = Collator(RSAMTokenizer(args.vocab, "official"), max_expressions_per_batch=24)

        # (index, epoch) pairs, as the training sampler yields them; the dataset is cycled.
        total = args.batch_size * (args.warmup_batches + -(-args.iters // args.batch_size))
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
                "samples_per_s_per_worker": round(n / elapsed / max(args.workers, 1), 1),
                "cpu_samples_per_s_per_worker": round(cpu_rate, 1),
                "workers": args.workers,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "ms_per_sample_per_worker": round(1000 * elapsed * max(args.workers, 1) / n, 2),
                "expressions_per_sample": round(expressions / n, 2),
                "image_size": args.size,
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "samples": n,
                "negative_ratio": args.negative_ratio,
                "generate_s": round(gen_s, 1),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
