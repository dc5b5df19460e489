"""Shared pytest helpers.

Reference data (golden files from the official code, state-dict manifests) live in a ``shared/`` folder
that is *not* part of the repository. It is found at

1. ``$RSAM_SHARED`` if that is set, else
2. ``<repo>/../shared`` (CI clones the repository with ``shared/`` beside it).

What this file provides:

* ``SHARED`` -- ``pathlib.Path`` of that folder, or ``None`` when it is absent;
  ``REFERENCE`` -- ``SHARED / "reference"`` (or ``None``). Import with ``from conftest import REFERENCE``.
* fixture ``shared_dir`` -- the ``SHARED`` path; skips the test (with the reason) when it is absent.
* fixture ``reference_file(name)`` factory -- path of ``shared/reference/<name>``; skips when missing.
* fixture ``golden_tiny`` (session scope) -- ``torch.load(golden_tiny.pt, weights_only=True)``, loaded once
  per test session (20 MB). Treat it as read-only: some tensors are aliased views, ``.clone()`` first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Optional[Path]:
    env = os.environ.get("RSAM_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared")
    for path in candidates:
        if (path / "reference").is_dir():
            return path.resolve()
    return None


SHARED: Optional[Path] = _find_shared()
REFERENCE: Optional[Path] = SHARED / "reference" if SHARED is not None else None
_WHERE = "set RSAM_SHARED or place shared/ beside the repository"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if SHARED is None:
        pytest.skip(f"shared reference folder not found ({_WHERE})")
    return SHARED


@pytest.fixture(scope="session")
def reference_file(shared_dir: Path) -> Callable[[str], Path]:
    def get(name: str) -> Path:
        path = shared_dir / "reference" / name
        if not path.is_file():
            pytest.skip(f"reference file {path} not found ({_WHERE})")
        return path

    return get


@pytest.fixture(scope="session")
def golden_tiny(reference_file) -> dict:
    import torch

    return torch.load(reference_file("golden_tiny.pt"), map_location="cpu", weights_only=True)
