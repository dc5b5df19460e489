"""Shared pytest helpers.

The reference files made with the official implementation live in ``tests/reference/`` (see its README): every
clone has them, so no test skips for missing reference data.

* ``REFERENCE`` -- ``pathlib.Path`` of that folder.
* fixture ``reference_file(name)`` factory -- path of ``tests/reference/<name>``.
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
