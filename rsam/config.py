"""Loading experiment configs: Hydra YAML files composed with command-line style overrides."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

__all__ = ["compose_config"]


def compose_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()):
    """Compose the YAML file ``path`` (its ``defaults:`` list included; the file's folder is the search path)
    with overrides such as ``["scratch.resolution=512"]``. Returns a ``DictConfig``.

    Raises FileNotFoundError for a missing file and ValueError (naming the file and the overrides) when Hydra
    cannot compose it.
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
        raise ValueError(f"cannot compose config {path} with overrides {list(overrides)}: {exc}") from None
