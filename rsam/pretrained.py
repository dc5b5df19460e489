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

This module writes and uploads; reading lives with every other weight format in
:mod:`rsam.checkpoint.pretrained_dir`, behind :func:`rsam.checkpoint.read_checkpoint`, so that
:func:`rsam.build.build_from_checkpoint` (and ``training/eval.py``, ``RSAMPredictor``, ``rsam-predict``,
``rsam-export``, ``rsam-ui``, ``trainer.checkpoint.init``) accepts a pretrained directory or a Hub repo id
wherever it accepts a checkpoint file. ``config.json`` is data: it is checked before use and never names what
gets called (:mod:`rsam.checkpoint.stored_config`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from rsam.atomic_files import atomic_path, write_text_atomically
from rsam.checkpoint.pretrained_dir import (CARD_NAME, CONFIG_NAME, FILES, FORMAT_VERSION, HUB_HINT, VOCAB_NAME,
                                           WEIGHTS_NAME, PretrainedError, is_pretrained_dir, looks_like_repo_id,
                                           read_pretrained, read_pretrained_config, resolve_pretrained)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "VOCAB_NAME", "CARD_NAME", "FILES", "FORMAT_VERSION", "PretrainedError",
           "save_pretrained", "load_pretrained", "read_pretrained", "is_pretrained_dir", "resolve_pretrained",
           "push_to_hub", "looks_like_repo_id"]

PathLike = Union[str, os.PathLike]


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
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "rsam_format": str(FORMAT_VERSION)})
    if vocab_file.resolve() != (out / VOCAB_NAME).resolve():
        with atomic_path(out / VOCAB_NAME) as tmp:
            shutil.copyfile(vocab_file, tmp)
    write_text_atomically(out / CONFIG_NAME, json.dumps(record, indent=2) + "\n")
    n_params = sum(t.numel() for t in model.parameters())
    write_text_atomically(out / CARD_NAME, render_model_card(cfg, record, metrics=metrics, num_params=n_params,
                                                             **dict(card or {})))
    return out


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

    return build_from_checkpoint(read_pretrained(resolve_pretrained(path_or_repo_id, revision, **hub_kwargs)),
                                 device=device)


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
        raise PretrainedError(f"push_to_hub needs {HUB_HINT}") from None
    with tempfile.TemporaryDirectory(prefix="rsam_push_") as tmp:
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source).expanduser()
            read_pretrained_config(folder)  # a valid config and vocabulary ...
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
