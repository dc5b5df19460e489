"""The leakage guard: images of a training split that also appear, by content, in an evaluation split.

Images are compared by the SHA-256 of their file bytes, so a copy under another name or in another dataset is
found too (RRSIS-D is derived from DIOR-RSVG, so overlaps between benchmarks are possible).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Tuple

__all__ = ["image_files", "content_hashes", "find_leaks", "report_leaks", "LeakageError"]


def image_files(dataset) -> List[str]:
    """Image paths of a ``ReferringDataset`` or of every dataset of a ``MixedDataset``."""
    if hasattr(dataset, "datasets"):
        return [p for d in dataset.datasets for p in image_files(d)]
    return [dataset.reader.image_path(n) for n in dataset.names]


def content_hashes(paths: Iterable[str], path_manager=None) -> Dict[str, str]:
    """hash -> first path with that content."""
    from iopath.common.file_io import g_pathmgr

    pm = path_manager or g_pathmgr

    def digest(path: str) -> Tuple[str, str]:
        h = hashlib.sha256()
        with pm.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), path

    out: Dict[str, str] = {}
    with ThreadPoolExecutor(8) as pool:
        for key, path in pool.map(digest, list(paths)):
            out.setdefault(key, path)
    return out


def find_leaks(train_paths: Iterable[str], eval_paths: Iterable[str]) -> List[Tuple[str, str]]:
    """(training image, evaluation image) pairs with identical content, sorted."""
    train = content_hashes(train_paths)
    evaluation = content_hashes(eval_paths)
    return sorted((train[k], evaluation[k]) for k in train.keys() & evaluation.keys())


class LeakageError(RuntimeError):
    pass


def report_leaks(train_dataset, eval_datasets: Dict[str, object], strict: bool, logger) -> int:
    """Log how many training images also appear in an evaluation split (with examples); with ``strict`` raise
    :class:`LeakageError` instead. Returns the count."""
    eval_paths = [p for d in eval_datasets.values() for p in image_files(d)]
    leaks = find_leaks(image_files(train_dataset), eval_paths)
    if not leaks:
        logger.info("leakage guard: no training image appears in %s", ", ".join(sorted(eval_datasets)))
        return 0
    examples = "; ".join(f"{a} == {b}" for a, b in leaks[:5])
    message = (f"leakage guard: {len(leaks)} training image(s) also appear, by content, in an evaluation split "
               f"({', '.join(sorted(eval_datasets))}), e.g. {examples}")
    if strict:
        raise LeakageError(message + " (trainer.strict_leakage: true)")
    logger.warning(message)
    return len(leaks)
