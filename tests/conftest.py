"""Shared pytest helpers.

The reference files made with the official implementation live in ``tests/reference/`` (see its README): every
clone has them, so no test skips for missing reference data.

* ``REFERENCE`` -- ``pathlib.Path`` of that folder.
* fixture ``reference_file(name)`` factory -- path of ``tests/reference/<name>``.
* fixture ``data_root`` (session scope) -- 80 synthetic 64-px images in RISORS format + their vocab.txt, for
  trainer tests.
* fixture ``golden_tiny`` (session scope) -- ``torch.load(golden_tiny.pt, weights_only=True)``, loaded once per
  test session (20 MB). Treat it as read-only: some tensors are aliased views, ``.clone()`` first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"


@pytest.fixture(scope="session")
def reference_file() -> Callable[[str], Path]:
    def get(name: str) -> Path:
        path = REFERENCE / name
        assert path.is_file(), f"reference file {path} is missing from the repository"
        return path

    return get


@pytest.fixture(scope="session")
def golden_tiny(reference_file) -> dict:
    import torch

    return torch.load(reference_file("golden_tiny.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """80 synthetic 64-px images (56 train / 16 val / 8 test), 2 objects each, and a vocab.txt for its words."""
    import re

    from rsam.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    scenes = generate(str(root), num_images=80, size=64, seed=0, min_objects=2, max_objects=2,
                      min_object_frac=0.2, max_object_frac=0.35, val_fraction=0.2, test_fraction=0.1)
    words = sorted({w for s in scenes for d in s.descriptions for w in re.findall(r"\w+|[^\w\s]", d.lower())})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return str(root)


@pytest.fixture(autouse=True)
def _reset_rsam_logger():
    """A Trainer's setup_logging gives the "rsam" logger its own handlers and stops propagation (one log per
    experiment), also when a module-scoped fixture built the Trainer; reset it after each test so that later
    tests' ``caplog`` still sees the library's records."""
    import logging

    yield
    logger = logging.getLogger("rsam")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
