"""Reading the small JSON files users hand us (configs, metrics): one object, errors that name the file."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Union

__all__ = ["read_json_object"]


def read_json_object(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The JSON object stored in ``path``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` ("<path>: not valid JSON (...)" /
    "<path>: must hold a JSON object, got <type>") for bad contents; callers re-raise as their own error types.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value
