"""Reading the small JSON files users hand us (configs, metrics): one object, errors that name the file."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Union

from rsam.errors import UserError

__all__ = ["read_json_object"]


def read_json_object(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The JSON object stored in ``path``.

    Raises ``FileNotFoundError`` for a missing file and :class:`UserError` ("<path>: not valid JSON (...)" /
    "<path>: must hold a JSON object, got <type>") for bad contents.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value
