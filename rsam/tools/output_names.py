"""How prediction outputs are named and stored, shared by rsam-predict, scene mode and the web demo."""
from __future__ import annotations

import re

__all__ = ["JSONL", "PNG_LEVEL", "slug"]

JSONL = "predictions.jsonl"  # one line per expression of a run
# zlib level of the written PNGs: 3 writes a 1030 x 614 overlay 3x faster than Pillow's default 6, ~7 % larger
PNG_LEVEL = 3


def slug(text: str, limit: int = 40) -> str:
    """``"The red ship!"`` -> ``"the-red-ship"``: an expression as a file-name part (ASCII letters and digits)."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name[:limit].rstrip("-") or "expression"
