"""Test helper for RSAM's optional C extensions (rsam._png, rsam._rle; see setup.py).

``require_built(module, name)`` returns ``module``, or skips the calling test when the extension is not built
(RSAM works without it), except under ``RSAM_REQUIRE_C_EXTENSIONS=1`` (set by .ci/run, where a C compiler is
always present): there a missing extension fails the test, so CI cannot pass on the fallback paths alone.
"""
from __future__ import annotations

import os
from typing import Optional

import pytest


def require_built(module: Optional[object], name: str) -> object:
    if module is None:
        if os.environ.get("RSAM_REQUIRE_C_EXTENSIONS") == "1":
            pytest.fail(f"{name} is not built (setup.py builds it when a C compiler is found)")
        pytest.skip(f"{name} is not built")
    return module
