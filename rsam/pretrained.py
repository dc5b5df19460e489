"""Pretrained directories: a trained RSAM as four plain files, loadable from disk or from the Hugging Face Hub.

    from rsam.pretrained import load_pretrained, save_pretrained, push_to_hub

    save_pretrained(model, cfg, "rsam-b-plus/", metrics={"mIoU": 0.71})   # cfg: the training config (dict)
    model, cfg = load_pretrained("rsam-b-plus/")                           # a local directory ...
    model, cfg = load_pretrained("user/rsam-b-plus", revision="v1.0")      # ... or a Hub repo id
    push_to_hub("rsam-b-plus/", "user/rsam-b-plus")

A pretrained directory holds

* ``config.json``: ``{"rsam_format": 1, "model": {...}, "tokenizer": {...}, "info": {...}}`` -- the resolved
  ``model`` node (``_target_: rsam.modeling.rsam.RSAM`` and its arguments) and ``tokenizer`` node of the
  training config, with ``tokenizer.vocab`` = ``"vocab.txt"`` (a path relative to the directory; loading
  points it at the directory's own file), and ``info`` (where it came from, its metrics);
* ``model.safetensors``: the state dict (official key names, see :mod:`rsam.checkpoint`); safetensors holds
  tensors only, so nothing on this path is ever unpickled;
* ``vocab.txt``: the BERT WordPiece vocabulary of the tokenizer;
* ``README.md``: the model card (YAML front matter as on the Hub: ``library_name``, ``license``, ``tags``; then
  metrics, data, recipe, licence), see :mod:`rsam.model_card`.

A string that is not an existing local directory is taken as a Hub repo id (``"user/name"``) and resolved
with ``huggingface_hub.snapshot_download`` into the standard HF cache (``HF_HUB_CACHE`` / ``HF_HOME``); with
``HF_HUB_OFFLINE=1`` a cached snapshot loads without any network access. The Hub functions need the optional
extra ``pip install "rsam[hub]"`` (huggingface_hub).

:func:`rsam.build.build_from_checkpoint` (and so ``training/eval.py --checkpoint DIR``, ``RSAMPredictor``
and ``rsam-predict``) accepts a pretrained directory wherever it accepts a checkpoint file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from rsam.json_files import read_json_object

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "VOCAB_NAME", "CARD_NAME", "FORMAT_VERSION", "PretrainedError",
           "save_pretrained", "load_pretrained", "read_pretrained", "is_pretrained_dir", "resolve_pretrained",
           "read_model_source", "push_to_hub", "looks_like_repo_id"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.txt"
CARD_NAME = "README.md"
FILES = (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME, CARD_NAME)
FORMAT_VERSION = 1
# Hub repo ids: "namespace/name" (letters, digits, '-', '_', '.'; no '--' or '..', see the Hub rules). A bare
# "name" is not accepted: it is far more likely a mistyped local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_HUB_HINT = 'pip install "rsam[hub]" (huggingface_hub)'

PathLike = Union[str, os.PathLike]


class PretrainedError(ValueError):
    """A pretrained directory that cannot be used; the message names the file and the field."""


# ------------------------------------------------------------------------------------------------------------
# writing


def _plain_config(config: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=str))  # a deep, JSON-clean copy
    raise TypeError(f"save_pretrained: config must be a dict or DictConfig, got {type(config).__name__}")


def _self_contained_model_node(node: dict) -> dict:
    """Inline a BERT ``config_path`` of the text encoder: the directory must not refer to files outside it."""
    text = node.get("text_encoder")
    if isinstance(text, dict) and text.get("config_path"):
        from rsam.modeling.text_encoder import read_bert_config

        values = read_bert_config(text["config_path"])
        inlined = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) and k not in text}
        node = dict(node, text_encoder={**inlined, **{k: v for k, v in text.items() if k != "config_path"}})
    return node


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _state_dict_for_safetensors(model: nn.Module) -> dict:
    """The model's state dict as contiguous CPU tensors, none sharing storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_pretrained(
    model: nn.Module,
    config: Any,
    directory: PathLike,
    *,
    tokenizer: Any = None,
    vocab: Optional[PathLike] = None,
    metrics: Optional[Mapping] = None,
    info: Optional[Mapping] = None,
    card: Optional[Mapping] = None,
) -> Path:
    """Write ``model`` as a pretrained directory (see the module docstring) -> the directory's path.

    Args:
        model: an :class:`rsam.modeling.rsam.RSAM` whose weights fit ``config["model"]``.
        config: the (training) config, dict or DictConfig, with a ``model`` node and, unless ``tokenizer`` is
            given, a ``tokenizer`` node. Only those two nodes go into ``config.json``; the rest (data, scratch,
            optim, trainer) feeds the model card's data and recipe sections.
        tokenizer: an :class:`rsam.data.tokenizer.RSAMTokenizer`; its vocabulary, mode and max_tokens replace
            the config's tokenizer node.
        vocab: the vocabulary file to copy (default: the tokenizer's, else ``config["tokenizer"]["vocab"]``).
        metrics: shown in the model card and stored in ``config.json`` ``info.metrics``: a flat
            ``{name: number}`` dict or a ``training/eval.py`` metrics.json record (``metrics``, ``split``,
            ``convention``, ``resolution``).
        info: more provenance for ``config.json`` ``info`` (e.g. the source checkpoint, its epoch and step).
        card: model card fields, see :func:`rsam.model_card.render_model_card` (``name``, ``license``,
            ``data``, ``description``, ``tags``).
    """
    from rsam import __version__
    from rsam.model_card import render_model_card

    cfg = _plain_config(config)
    if not isinstance(cfg.get("model"), dict) or "_target_" not in cfg["model"]:
        raise PretrainedError("save_pretrained: the config has no `model` node with a `_target_`")
    tok_node = dict(cfg.get("tokenizer") or {})
    if tokenizer is not None:
        tok_node.update(mode=tokenizer.mode, max_tokens=int(tokenizer.max_tokens))
        tok_node.setdefault("_target_", "rsam.data.tokenizer.RSAMTokenizer")
        vocab = vocab if vocab is not None else tokenizer.vocab_path
    vocab = vocab if vocab is not None else tok_node.get("vocab")
    if not vocab:
        raise PretrainedError("save_pretrained: no vocabulary: pass vocab=<vocab.txt> or a config with tokenizer.vocab")
    vocab_file = Path(vocab).expanduser()
    if vocab_file.is_dir():
        vocab_file = vocab_file / VOCAB_NAME
    if not vocab_file.is_file():
        raise FileNotFoundError(f"save_pretrained: vocabulary file {vocab_file} not found (tokenizer.vocab)")
    tok_node["vocab"] = VOCAB_NAME
    tok_node.setdefault("_target_", "rsam.data.tokenizer.RSAMTokenizer")
    tok_node.setdefault("mode", "official")

    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    record = {"rsam_format": FORMAT_VERSION, "model": _self_contained_model_node(cfg["model"]),
              "tokenizer": tok_node,
              "info": {"rsam_version": __version__, **dict(info or {}),
                       **({"metrics": json.loads(json.dumps(dict(metrics), default=str))} if metrics else {})}}

    from safetensors.torch import save_file

    tensors = _state_dict_for_safetensors(model)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={
        "format": "pt", "rsam_format": str(FORMAT_VERSION)}))
    if vocab_file.resolve() != (out / VOCAB_NAME).resolve():
        _atomic_write(out / VOCAB_NAME, lambda p: shutil.copyfile(vocab_file, p))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))
    n_params = sum(t.numel() for t in model.parameters())
    text = render_model_card(cfg, record, metrics=metrics, num_params=n_params, **dict(card or {}))
    _atomic_write(out / CARD_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return out


# ------------------------------------------------------------------------------------------------------------
# reading


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


def read_config(directory: PathLike) -> dict:
    """``config.json`` of a pretrained directory, validated, with ``tokenizer.vocab`` made absolute."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained directory not found: {root}")
    path = root / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an RSAM pretrained directory holds {', '.join(FILES[:3])} "
                                "(write one with rsam-export or save_pretrained)")
    record = _read_config_json(path)
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
    vocab = Path(tok["vocab"])
    vocab = vocab if vocab.is_absolute() else root / vocab
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} not found (field 'tokenizer.vocab' of {path})")
    record["tokenizer"] = dict(tok, vocab=str(vocab.resolve()))
    return record


def read_pretrained(directory: PathLike):
    """A pretrained directory as a :class:`rsam.checkpoint.Checkpoint` (state dict + config).

    ``source`` is the weights file, ``extra["config_file"]`` the config file (error messages name them).
    """
    from safetensors.torch import load_file

    from rsam.checkpoint import Checkpoint

    root = Path(directory).expanduser()
    record = read_config(root)
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
    return Checkpoint(source=str(weights), state_dict=sd, config=config,
                      extra={"config_file": str(root / CONFIG_NAME), "info": record.get("info") or {},
                             "pretrained_dir": str(root)})


def read_model_source(path: PathLike):
    """A checkpoint file or a pretrained directory as a :class:`rsam.checkpoint.Checkpoint`."""
    from rsam.checkpoint import read_checkpoint

    return read_pretrained(path) if is_pretrained_dir(path) else read_checkpoint(path)


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
        raise PretrainedError(f"{name}: not a local directory; loading Hub repo ids needs {_HUB_HINT}") from None
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


def load_pretrained(
    path_or_repo_id: PathLike,
    revision: Optional[str] = None,
    device: Union[None, str, torch.device] = None,
    **hub_kwargs: Any,
) -> Tuple[nn.Module, dict]:
    """Build and load the model of a pretrained directory or Hub repo -> ``(model in eval mode, config)``.

    ``config`` holds the ``model`` and ``tokenizer`` nodes (``tokenizer.vocab``: the absolute path of the
    directory's ``vocab.txt``; build the tokenizer with :func:`rsam.data.tokenizer.tokenizer_from_config`).
    ``device``: default CUDA when available. ``hub_kwargs``: ``cache_dir``, ``local_files_only``, ``token``
    (see :func:`resolve_pretrained`). Weights that do not fit ``config.json`` raise
    :class:`rsam.build.ConfigMismatchError` naming both files.
    """
    from rsam.build import build_from_checkpoint

    directory = resolve_pretrained(path_or_repo_id, revision, **hub_kwargs)
    return build_from_checkpoint(read_pretrained(directory), device=device)


# ------------------------------------------------------------------------------------------------------------
# the Hub


def push_to_hub(
    source: Any,
    repo_id: str,
    *,
    config: Any = None,
    token: Any = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs: Any,
):
    """Upload a pretrained directory to the Hub repo ``repo_id`` (created when missing) -> the commit info.

    Args:
        source: a pretrained directory, an :class:`rsam.predictor.RSAMPredictor`, or a model (then ``config``
            is required); models are written to a temporary directory with :func:`save_pretrained` first
            (``save_kwargs``: its keyword arguments).
        token: Hub token (default: huggingface_hub's own lookup, e.g. ``HF_TOKEN`` or ``hf auth login``).
        private, revision, commit_message, create_pr: as in ``HfApi.create_repo`` / ``HfApi.upload_folder``.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PretrainedError(f"push_to_hub needs {_HUB_HINT}") from None
    with tempfile.TemporaryDirectory(prefix="rsam_push_") as tmp:
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source).expanduser()
            read_config(folder)  # a valid config and vocabulary ...
            if not (folder / WEIGHTS_NAME).is_file():  # ... and weights, before anything goes over the network
                raise FileNotFoundError(f"{folder / WEIGHTS_NAME} not found")
        elif hasattr(source, "save_pretrained") and hasattr(source, "tokenizer"):  # an RSAMPredictor
            folder = source.save_pretrained(tmp, **save_kwargs)
        elif isinstance(source, nn.Module):
            if config is None:
                raise ValueError("push_to_hub: a model needs config= (its training config) to be saved")
            folder = save_pretrained(source, config, tmp, **save_kwargs)
        else:
            raise TypeError(f"push_to_hub: expected a directory, an RSAMPredictor or a model, got "
                            f"{type(source).__name__}")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        present = [name for name in FILES if (Path(folder) / name).is_file()]
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message or "Upload RSAM pretrained model",
                                 create_pr=create_pr, allow_patterns=present)
