"""Reading pretrained directories: a trained RSAM as plain files, on disk or in the Hugging Face Hub cache.

A pretrained directory (written by :func:`rsam.pretrained.save_pretrained` / ``rsam-export``) holds

* ``config.json``: ``{"rsam_format": 1, "model": {...}, "tokenizer": {...}, "info": {...}}`` -- the resolved
  ``model`` node (``_target_: rsam.modeling.rsam.RSAM`` and its arguments) and ``tokenizer`` node of the
  training config, with ``tokenizer.vocab`` = ``"vocab.txt"`` (relative to the directory), and ``info`` (where it
  came from, its metrics). It is data: :func:`read_pretrained_config` checks it with
  :func:`rsam.checkpoint.stored_config.check_stored_config` before anything uses it;
* ``model.safetensors``: the state dict (official key names); safetensors holds tensors only, so nothing on
  this path is ever unpickled;
* ``vocab.txt``: the BERT WordPiece vocabulary of the tokenizer;
* ``README.md``: the model card.

A string that is not an existing local path but looks like ``"namespace/name"`` is a Hub repo id, resolved with
``huggingface_hub.snapshot_download`` into the standard HF cache (``HF_HUB_OFFLINE=1``: the cache only). The Hub
needs the optional extra ``pip install "rsam[hub]"``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from rsam.checkpoint.checkpoint import Checkpoint
from rsam.checkpoint.stored_config import check_stored_config
from rsam.errors import UserError
from rsam.json_files import read_json_object

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "VOCAB_NAME", "CARD_NAME", "FILES", "FORMAT_VERSION", "PretrainedError",
           "is_pretrained_dir", "read_pretrained_config", "read_pretrained", "looks_like_repo_id",
           "resolve_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.txt"
CARD_NAME = "README.md"
FILES = (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME, CARD_NAME)
FORMAT_VERSION = 1
# Hub repo ids: "namespace/name" (letters, digits, '-', '_', '.'; no '--' or '..', see the Hub rules). A bare
# "name" is not accepted: it is far more likely a mistyped local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
HUB_HINT = 'pip install "rsam[hub]" (huggingface_hub)'

PathLike = Union[str, os.PathLike]


class PretrainedError(UserError):
    """A pretrained directory that cannot be used; the message names the file and the field."""


def _read_config_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise PretrainedError(str(exc)) from None


def is_pretrained_dir(path: Any) -> bool:
    """True for a directory that is (or claims to be) an RSAM pretrained directory, not an HF BERT directory.

    A directory without ``config.json`` counts (loading it then names the missing file), as does one whose
    ``config.json`` has ``rsam_format`` or a ``model`` node or is not valid JSON; a BERT ``config.json``
    (``model_type``, no ``model``) does not.
    """
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    cfg = p / CONFIG_NAME
    if not cfg.is_file():
        return True
    try:
        record = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return True
    return not isinstance(record, dict) or "rsam_format" in record or "model" in record


def read_pretrained_config(directory: PathLike) -> dict:
    """``config.json`` of a pretrained directory, checked (plain values, RSAM's builders only), with
    ``tokenizer.vocab`` made absolute."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained directory not found: {root}")
    path = root / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an RSAM pretrained directory holds {', '.join(FILES[:3])} "
                                "(write one with rsam-export or save_pretrained)")
    record = check_stored_config(_read_config_json(path), str(path))
    version = record.get("rsam_format")
    if version is None:
        raise PretrainedError(f"{path}: field 'rsam_format' is missing (not an RSAM pretrained config)")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PretrainedError(f"{path}: field 'rsam_format' is {version!r}; this RSAM reads format "
                              f"{FORMAT_VERSION} (upgrade rsam)")
    model = record.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("_target_"), str):
        raise PretrainedError(f"{path}: field 'model' must be an object with a '_target_' string")
    tok = record.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab"), str):
        raise PretrainedError(f"{path}: field 'tokenizer' must be an object with a 'vocab' string")
    # a name inside the directory (the Hub cache links it to a blob elsewhere: judged by name, not by target)
    relative = os.path.normpath(tok["vocab"])
    if os.path.isabs(relative) or relative.split(os.sep)[0] == os.pardir:
        raise PretrainedError(f"{path}: key 'tokenizer.vocab': {tok['vocab']!r} is not a file inside the directory")
    vocab = root / relative
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} not found (field 'tokenizer.vocab' of {path})")
    record["tokenizer"] = dict(tok, vocab=str(vocab.resolve()))
    return record


def read_pretrained(directory: PathLike):
    """A pretrained directory as a :class:`rsam.checkpoint.Checkpoint` (state dict + config).

    ``source`` is the weights file, ``extra["config_file"]`` the config file (error messages name them).
    """
    from safetensors.torch import load_file

    root = Path(directory).expanduser()
    record = read_pretrained_config(root)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in ("pytorch_model.bin", "model.pt", "model.pth") if (root / n).is_file()]
        hint = (f"; it holds {pickled[0]}, but pretrained directories are read from safetensors only (no "
                "pickle): re-export it with rsam-export") if pickled else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    try:
        sd = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise PretrainedError(f"{weights}: not a readable safetensors file ({exc})") from None
    if not sd:
        raise PretrainedError(f"{weights}: holds no tensors")
    config = {"model": record["model"], "tokenizer": record["tokenizer"]}
    return Checkpoint(source=str(weights), state_dict=sd, config=config, kind="pretrained",
                      extra={"config_file": str(root / CONFIG_NAME), "info": record.get("info") or {},
                             "pretrained_dir": str(root)})


def looks_like_repo_id(text: Any) -> bool:
    """``"user/name"`` that is no existing path and has no file extension of a checkpoint."""
    if not isinstance(text, str) or os.path.exists(os.path.expanduser(text)):
        return False
    if text.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors")) or "--" in text or ".." in text:
        return False
    return bool(_REPO_ID.match(text))


def resolve_pretrained(
    path_or_repo_id: PathLike,
    revision: Optional[str] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    local_files_only: bool = False,
    token: Any = None,
) -> Path:
    """A local pretrained directory, or the cached snapshot of a Hub repo (downloaded when needed).

    Local directories are returned as they are (``revision`` must then be None). Repo ids go through
    ``huggingface_hub.snapshot_download`` (``HF_HUB_OFFLINE=1`` or ``local_files_only``: the cache only).
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"{local} is a local directory: revision={revision!r} applies to Hub repo ids only")
        return local
    if local.exists():
        raise PretrainedError(f"{local} is a file, not a pretrained directory; checkpoint files load with "
                              "rsam.build.build_from_checkpoint / RSAMPredictor.from_checkpoint")
    name = os.fspath(path_or_repo_id)
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"{name}: no such directory, and not a Hub repo id ('namespace/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise PretrainedError(f"{name}: not a local directory; loading Hub repo ids needs {HUB_HINT}") from None
    from rsam import __version__

    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                   token=token, allow_patterns=list(FILES), library_name="rsam",
                                   library_version=__version__)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {name}: revision {revision!r} not found") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise FileNotFoundError(f"Hub repo {name}: not found or not accessible ({type(exc).__name__}); no local "
                                "directory of that name either") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name}: no such local directory, and Hub repo {name}"
            + (f" (revision {revision})" if revision else "")
            + " is not in the local HF cache and the Hub cannot be reached (offline: HF_HUB_OFFLINE=1 or no "
            "network); download it once online, or point HF_HUB_CACHE / HF_HOME at a filled cache") from None
    except Exception as exc:  # network failures, incomplete snapshots, ...: one line naming the repo
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FileNotFoundError(f"Hub repo {name}: cannot be fetched ({type(exc).__name__}: {text})") from None
    return Path(folder)


