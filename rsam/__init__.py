"""RSAM: referring remote-sensing image segmentation (SAM 2.1 Hiera image encoder + BERT + two-way guidance).

Public entry points, imported lazily so that ``import rsam`` stays cheap (no torch / transformers import) and
has no side effects:

* :class:`RSAM` -- the network (``rsam.modeling.rsam``);
* :func:`build_rsam` -- build from a config and load a checkpoint (``rsam.build``);
* :class:`RSAMPredictor` -- image + expressions -> masks at the original size (``rsam.predictor``);
* :func:`load_pretrained`, :func:`save_pretrained`, :func:`push_to_hub` -- pretrained directories and the
  Hugging Face Hub (``rsam.pretrained``): ``model, cfg = rsam.load_pretrained("user/rsam-b-plus")``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RSAM", "RSAMPredictor", "build_rsam", "load_pretrained", "save_pretrained", "push_to_hub",
           "__version__"]

_LAZY = {
    "RSAM": "rsam.modeling.rsam",
    "build_rsam": "rsam.build",
    "RSAMPredictor": "rsam.predictor",
    "load_pretrained": "rsam.pretrained",
    "save_pretrained": "rsam.pretrained",
    "push_to_hub": "rsam.pretrained",
}

if TYPE_CHECKING:  # for type checkers and IDEs only
    from rsam.build import build_rsam
    from rsam.modeling.rsam import RSAM
    from rsam.predictor import RSAMPredictor
    from rsam.pretrained import load_pretrained, push_to_hub, save_pretrained


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'rsam' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a missing dependency inside the module: report it as is
            raise
        raise AttributeError(f"rsam.{name} is not available: module {module_name} is missing") from exc
    value = getattr(module, name)
    globals()[name] = value  # cache: __getattr__ is only consulted for missing names
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
