"""Experiment configs: Hydra YAML files the user writes, composed with overrides and instantiated.

These are code the user chose to run: a ``_target_`` may name any class. Configs that come with weights
(checkpoints, pretrained directories) are data and never pass through here (:mod:`rsam.checkpoint.stored_config`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

from rsam.errors import UserError

__all__ = ["compose_config", "instantiate"]


def compose_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()):
    """Compose the YAML file ``path`` (its ``defaults:`` list included; the file's folder is the search path)
    with overrides such as ``["scratch.resolution=512"]``. Returns a ``DictConfig``.

    Raises FileNotFoundError for a missing file and :class:`UserError` (naming the file and the overrides) when
    Hydra cannot compose it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if GlobalHydra.instance().is_initialized():  # e.g. called inside a Hydra app: compose in a fresh context
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(file.parent), version_base="1.3"):
            return compose(config_name=file.stem, overrides=list(overrides))
    except HydraException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot compose config {path} with overrides {list(overrides)}: {first}") from None


def instantiate(node: Any, what: str) -> Any:
    """Hydra's ``instantiate(node, _convert_="all")``; a node that does not build (an unknown ``_target_``, an
    argument its class refuses) is a :class:`UserError` naming ``what`` (e.g. ``"the config's data.test.dataset"``)
    and the class's own message. User errors raised inside a constructor (a missing data folder) pass unchanged."""
    from hydra.errors import HydraException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, _convert_="all")
    except HydraException as exc:
        cause = exc.__cause__
        if isinstance(cause, (UserError, FileNotFoundError)):
            raise cause from None
        text = str(cause) if isinstance(cause, (ValueError, TypeError, KeyError, ImportError)) else str(exc)
        first = (text.strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot build {what}: {first}") from None
