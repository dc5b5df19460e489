"""A config that comes with weights is data: it is checked against RSAM's schema and built without Hydra.

Two kinds of config reach RSAM:

* the experiment configs a user writes and passes with ``-c`` / ``config=``: code the user chose to run. They
  go through Hydra's ``instantiate``, so a ``_target_`` may name any class (e.g. a fork's own dataset);
* the configs stored with weights: the ``config`` entry of a training checkpoint, ``config.json`` of a
  pretrained directory or a Hub download, the dataset recorded beside saved predictions. Whoever made the file
  chose them, so they may not decide what gets called. :func:`check_stored_config` accepts only plain values
  (numbers, strings, booleans, null, lists and string-keyed objects of them) and ``_target_`` names from
  :data:`STORED_BUILDERS` -- RSAM's own model, tokenizer, data and loss classes -- before anything is built,
  and :func:`build_stored` builds such a node by looking each name up in that table (nothing is imported by a
  name read from the file). Anything else is a :class:`StoredConfigError` naming the file and the key.

A fork whose checkpoints name its own classes registers them once, in its own code:
``register_stored_builder("mypkg.data.MyDataset", MyDataset)``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Optional, Union

from rsam.errors import UserError

__all__ = ["STORED_BUILDERS", "MODEL_TARGETS", "StoredConfigError", "check_stored_config", "build_stored",
           "register_stored_builder", "stored_builder"]

# name in a stored config -> "module:attribute" of the builder. The keys are the names our configs have always
# written, so every checkpoint and pretrained directory saved so far still loads.
STORED_BUILDERS: dict[str, Union[str, Callable[..., Any]]] = {
    "rsam.modeling.rsam.RSAM": "rsam.modeling.rsam:RSAM",
    "rsam.modeling.backbones.zoo.build_image_encoder": "rsam.modeling.backbones.zoo:build_image_encoder",
    "rsam.modeling.backbones.image_encoder.ImageEncoder": "rsam.modeling.backbones.image_encoder:ImageEncoder",
    "rsam.modeling.backbones.image_encoder.FpnNeck": "rsam.modeling.backbones.image_encoder:FpnNeck",
    "rsam.modeling.backbones.hieradet.Hiera": "rsam.modeling.backbones.hieradet:Hiera",
    "rsam.modeling.position_encoding.PositionEmbeddingSine": "rsam.modeling.position_encoding:PositionEmbeddingSine",
    "rsam.modeling.text_encoder.build_bert": "rsam.modeling.text_encoder:build_bert",
    "rsam.data.tokenizer.RSAMTokenizer": "rsam.data.tokenizer:RSAMTokenizer",
    "rsam.data.dataset.ReferringDataset": "rsam.data.dataset:ReferringDataset",
    "rsam.data.mixed.MixedDataset": "rsam.data.mixed:MixedDataset",
    "rsam.data.transforms.TrainTransform": "rsam.data.transforms:TrainTransform",
    "rsam.data.transforms.EvalTransform": "rsam.data.transforms:EvalTransform",
    "rsam.data.batch.Collator": "rsam.data.batch:Collator",
    "rsam.losses.RSAMLoss": "rsam.losses:RSAMLoss",
}
# The names a stored ``model`` node may use (the network and its parts).
MODEL_TARGETS = {name for name in STORED_BUILDERS if name.startswith("rsam.modeling.")}

TARGET_KEY = "_target_"
MAX_DEPTH = 32  # our configs nest 6 levels deep
MAX_NODES = 200_000  # values in one config; ours hold a few hundred
MAX_STRING = 65_536  # characters in one string value or key


class StoredConfigError(UserError):
    """A stored config that RSAM refuses to use; the message names the file and the key."""


def register_stored_builder(name: str, builder: Callable[..., Any], model_part: bool = False) -> None:
    """Let stored configs name ``name`` (a fork's own class); ``model_part``: it may appear in a model node."""
    if not isinstance(name, str) or not callable(builder):
        raise TypeError("register_stored_builder(name: str, builder: callable)")
    STORED_BUILDERS[name] = builder
    if model_part:
        MODEL_TARGETS.add(name)


def _refuse(source: str, key: str, problem: str) -> StoredConfigError:
    where = f"key '{key}'" if key else "the config"
    return StoredConfigError(f"{source}: {where}: {problem} (a config stored with weights is data; pass your own "
                             "config file with -c / --config to build something else)")


def check_stored_config(config: Any, source: str, prefix: str = "") -> dict:
    """A deep, plain copy of ``config`` after checking every key and value; raises :class:`StoredConfigError`.

    Args:
        config: the stored config (a mapping, as read from JSON or ``torch.load(weights_only=True)``).
        source: the file it was read from (named in errors).
        prefix: the key of ``config`` inside that file (e.g. ``"config"`` for a training checkpoint).
    """
    if not isinstance(config, Mapping):
        raise _refuse(source, prefix, f"must be an object, got {type(config).__name__}")
    budget = [MAX_NODES]
    return _checked(config, source, prefix, 0, budget)


def _checked(value: Any, source: str, key: str, depth: int, budget: list) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _refuse(source, key, f"more than {MAX_NODES} values")
    if depth > MAX_DEPTH:
        raise _refuse(source, key, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise _refuse(source, key, f"a string of more than {MAX_STRING} characters")
        if "${" in value:
            raise _refuse(source, key, f"{value!r} is an interpolation; stored configs are resolved")
        return value
    if isinstance(value, (list, tuple)):
        return [_checked(v, source, f"{key}[{i}]", depth + 1, budget) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for name, item in value.items():
            where = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or len(name) > MAX_STRING:
                raise _refuse(source, key, f"the key {str(name)[:80]!r} is not a string")
            if name == TARGET_KEY:
                if not isinstance(item, str) or item not in STORED_BUILDERS:
                    raise _refuse(source, where, f"{str(item)[:200]!r} is not one of RSAM's builders")
            elif name.startswith("_") and name.endswith("_"):
                raise _refuse(source, where, "Hydra's special keys are not allowed (only _target_)")
            out[name] = _checked(item, source, where, depth + 1, budget)
        return out
    raise _refuse(source, key, f"a {type(value).__module__}.{type(value).__name__} value; only numbers, strings, "
                  "booleans, null, lists and objects are allowed")


def stored_builder(name: str) -> Callable[..., Any]:
    """The callable a stored ``_target_`` name stands for (a name of :data:`STORED_BUILDERS`)."""
    builder = STORED_BUILDERS[name]
    if isinstance(builder, str):
        module, _, attribute = builder.partition(":")
        builder = STORED_BUILDERS[name] = getattr(importlib.import_module(module), attribute)
    return builder


def build_stored(node: Any, source: str, key: str = "", allowed: Optional[set] = None) -> Any:
    """Build a checked stored node: every object with a ``_target_`` becomes ``builder(**built arguments)``,
    innermost first; other objects and lists stay plain ``dict`` / ``list`` (Hydra's ``_convert_="all"``).

    ``allowed``: the only ``_target_`` names this node may use (e.g. :data:`MODEL_TARGETS`); default all.
    The node is checked again here, so a caller cannot build an unchecked one by mistake.
    """
    node = _checked(node, source, key, 0, [MAX_NODES])
    return _build(node, source, key, STORED_BUILDERS.keys() if allowed is None else allowed)


def _build(node: Any, source: str, key: str, allowed) -> Any:
    if isinstance(node, list):
        return [_build(v, source, f"{key}[{i}]", allowed) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    args = {k: _build(v, source, f"{key}.{k}" if key else k, allowed) for k, v in node.items() if k != TARGET_KEY}
    if TARGET_KEY not in node:
        return args
    name, where = node[TARGET_KEY], f"{key}.{TARGET_KEY}" if key else TARGET_KEY
    if name not in allowed:
        raise _refuse(source, where, f"{name!r} cannot be built here")
    try:
        return stored_builder(name)(**args)
    except (UserError, FileNotFoundError):  # the data it points at is missing or bad: its own message says so
        raise
    except (TypeError, ValueError, KeyError) as exc:  # arguments the builder does not take or accept
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise StoredConfigError(f"{source}: key '{key or '(root)'}': cannot build {name}: {text}") from None
