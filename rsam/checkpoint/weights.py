"""Every weight file RSAM accepts: one reader (:func:`read_checkpoint`) and one loader (:func:`load_weights`).

:func:`read_checkpoint` turns a file, an HF BERT directory or an in-memory dict into a :class:`Checkpoint`: a flat
``{name: tensor}`` state dict (wrapper prefixes of DDP / ``torch.compile`` removed), the config stored with it
(our checkpoints) and the rest of a training checkpoint (optimizer, counters, RNG states). Every ``torch.load``
of the project happens in :func:`read_torch_file`, with ``weights_only=True``: no file is ever unpickled.

:func:`load_weights` recognises the format from the keys and applies a few small, named key-mapping rules:

=============  ===========================================================  =============================
format         recognised by                                                what is loaded
=============  ===========================================================  =============================
``rsam``       ours (``{"model": sd, ...}``) or the official RSAM release   every key; the official
               (same names + the video-only leftovers)                      video-only leftovers are
                                                                            dropped with one log line
``sam2``       SAM 2.1 ``.pt`` (``memory_attention.*`` etc., no text keys)  ``image_encoder.*``; with
                                                                            ``take_sam_heads=True`` also
                                                                            the prompt encoder / decoder
``bert``       HF directory (config.json + model.safetensors or             ``text_encoder.*``
               pytorch_model.bin) or the raw ``bert-base.bin``
               (``bert.*`` keys, ``gamma``/``beta``, ``cls.*``)
=============  ===========================================================  =============================

Everything that is neither loaded nor dropped by a documented rule is an error listing the keys; a shape
mismatch is an error naming the key and both shapes. Parts that a format does not cover (e.g. the fusion
module when loading SAM 2.1) keep their current values.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from rsam.checkpoint.checkpoint import KINDS, Checkpoint, CheckpointError, StateDict
from rsam.checkpoint import pretrained_dir
from rsam.checkpoint.stored_config import check_stored_config

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LoadReport",
    "load_weights",
    "read_checkpoint",
    "read_torch_file",
    "detect_format",
    "KINDS",
    "OFFICIAL_VIDEO_LEFTOVERS",
]

log = logging.getLogger(__name__)


# Official RSAM modules that only exist because RSAM subclasses SAM 2's video model; our model has none.
OFFICIAL_VIDEO_LEFTOVERS = (
    "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr",
    "mask_downsample.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
)
# SAM 2.1 groups that mark a SAM 2 (video) checkpoint.
SAM2_VIDEO_GROUPS = ("memory_attention.", "memory_encoder.")
SAM_HEADS = ("sam_prompt_encoder.", "sam_mask_decoder.")
# Prefixes that wrappers add in front of every key (DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# BERT config fields that change parameter shapes or counts.
BERT_STRUCTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings", "type_vocab_size")

_MAX_LISTED = 20


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)  # model keys that received a tensor
    dropped: dict[str, int] = field(default_factory=dict)  # group -> number of checkpoint keys ignored
    missing: list[str] = field(default_factory=list)  # model keys left untouched although in scope (strict=False)

    def __str__(self) -> str:
        text = f"{self.source} ({self.format}): loaded {len(self.loaded)} tensors"
        if self.dropped:
            text += f"; ignored {_format_groups(self.dropped)}"
        if self.missing:
            text += f"; {len(self.missing)} model keys not in the checkpoint"
        return text


# ------------------------------------------------------------------------------------------------------------
# reading files


def read_torch_file(path: Union[str, os.PathLike]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for anything ``torch.load``
    cannot read (which, depending on the bytes, surfaces as pickle, zip, EOF or even ``KeyError`` errors),
    including files holding objects other than tensors and plain containers.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the bytes make torch.load trip on
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors and plain containers ({_first_line(exc)}); RSAM "
                "never unpickles them. Re-save the file as a state dict (torch.save(model.state_dict(), ...))"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_hf_bert_dir(path: Path) -> tuple[StateDict, dict]:
    from rsam.modeling.text_encoder import read_bert_config  # imported here: it pulls in transformers

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: a BERT directory needs config.json (not found)")
    config = read_bert_config(config_file)
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = path / name
        if weights.is_file():
            sd = _load_safetensors(weights) if name.endswith(".safetensors") else read_torch_file(weights)
            return dict(sd), config
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")


def read_checkpoint(source: Union[str, os.PathLike, Mapping, Checkpoint], revision: Optional[str] = None,
                    **hub: Any) -> Checkpoint:
    """The one answer to "what is this weights source, and what does it hold" -> a :class:`Checkpoint`.

    Accepts a file (``.pt``/``.pth``/``.bin``/``.safetensors``: ours, official RSAM, SAM 2.1, BERT), a pretrained
    directory, an HF BERT directory, a Hub repo id (``"user/name"``, with ``revision`` and ``hub`` =
    ``cache_dir`` / ``local_files_only`` / ``token``; see :func:`.pretrained_dir.resolve_pretrained`), an
    in-memory dict (a state dict, or a checkpoint holding one under ``"model"``) or a :class:`Checkpoint`
    (returned as is). A stored config is checked before it is returned: a file whose config names anything but
    RSAM's own builders, or holds other than plain values, is refused (:class:`.StoredConfigError`).
    """
    if isinstance(source, Checkpoint):
        return source
    bert_config = None
    if isinstance(source, Mapping):
        obj, name = source, "<state dict>"
    else:
        path = Path(source).expanduser()
        if revision is not None or hub or (not path.exists() and pretrained_dir.looks_like_repo_id(os.fspath(source))):
            return pretrained_dir.read_pretrained(pretrained_dir.resolve_pretrained(source, revision, **hub))
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if pretrained_dir.is_pretrained_dir(path):
            return pretrained_dir.read_pretrained(path)
        name = str(path)
        if path.is_dir():
            obj, bert_config = _read_hf_bert_dir(path)
        elif path.suffix == ".safetensors":
            obj = _load_safetensors(path)
        else:
            obj = read_torch_file(path)
    config, extra = None, {}
    # {"model": sd, "config": ..., "optimizer": ..., ...} (ours, SAM 2.1) -> sd + the rest
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        extra = {k: v for k, v in obj.items() if k != "model"}
        config = extra.pop("config", None)
        config = check_stored_config(config, name, "config") if config is not None else None
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{name}: expected a (non-empty) state dict or {{'model': state_dict}}, "
                              f"found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: entries that are not named tensors: {_listing(map(str, bad))}")
    sd = dict(obj)
    # rule "wrapper": DDP / torch.compile prefixes, in whichever order the wrappers were applied
    prefix = _wrapper_prefix(sd)
    while prefix is not None:
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        prefix = _wrapper_prefix(sd)
    fmt = detect_format(sd)
    kind = fmt if fmt != "rsam" else ("training" if config is not None else "official")
    return Checkpoint(source=name, state_dict=sd, config=config, extra=extra, bert_config=bert_config, kind=kind)


def _wrapper_prefix(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The wrapper prefix that every key carries, or None."""
    if not sd:
        return None
    return next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """``"bert"``, ``"sam2"`` or ``"rsam"`` (ours or official RSAM), from the key names."""
    keys = list(sd)
    if any(k.startswith(("bert.", "cls.")) for k in keys) or "embeddings.word_embeddings.weight" in sd:
        return "bert"
    has_text = any(k.startswith(("text_encoder.", "description_transformer.", "text_proj.")) for k in keys)
    if any(k.startswith(SAM2_VIDEO_GROUPS) for k in keys) or (not has_text and any(
            k.startswith("image_encoder.") for k in keys)):
        return "sam2"
    return "rsam"


# ------------------------------------------------------------------------------------------------------------
# key-mapping rules


def _is_leftover(key: str) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in OFFICIAL_VIDEO_LEFTOVERS)


def _group(key: str) -> str:
    return key.split(".", 1)[0]


def _map_bert_key(key: str) -> Optional[str]:
    """Raw / HF BERT name -> name inside ``BertModel(add_pooling_layer=False)``; None = drop."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.startswith(("cls.", "pooler.")) or key.endswith(("position_ids", "token_type_ids")):
        return None  # MLM/NSP heads, pooler (not built) and index buffers (not persistent in HF)
    # TF-era names of the original release: LayerNorm.gamma/beta
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def _scope_prefix(model_keys: Mapping, group: str, probe: str) -> str:
    """Prefix under which ``group`` lives in the model: "group." for the full RSAM, "" if the model *is* it."""
    if any(k.startswith(group + ".") for k in model_keys):
        return group + "."
    if probe in model_keys:
        return ""
    raise CheckpointError(f"the model has no {group!r} submodule to load this checkpoint into")


# ------------------------------------------------------------------------------------------------------------
# loading


def load_weights(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping, Checkpoint],
    *,
    strict: bool = True,
    take_sam_heads: bool = False,
) -> LoadReport:
    """Load the weights of ``source`` (anything :func:`read_checkpoint` reads) into ``model`` in place.

    ``strict``: every model key in the scope of the format (all keys for ``rsam``, ``image_encoder.*``
    (+ heads) for ``sam2``, ``text_encoder.*`` for ``bert``) must be present. Unexpected keys and shape
    mismatches are always errors. ``take_sam_heads``: for SAM 2.1, also load the prompt encoder and mask
    decoder (the official RSAM recipe keeps them random). Returns a :class:`LoadReport`.
    """
    ckpt = read_checkpoint(source)
    sd, source = ckpt.state_dict, ckpt.source
    fmt = detect_format(sd)
    model_sd = model.state_dict()
    dropped: Counter = Counter()

    if fmt == "bert":
        prefix = _scope_prefix(model_sd, "text_encoder", "embeddings.word_embeddings.weight")
        _check_bert_config(model, prefix, ckpt.bert_config, source)
        mapped: StateDict = {}
        for key, value in sd.items():
            new = _map_bert_key(key)
            if new is None:
                dropped[_bert_drop_group(key)] += 1
            else:
                mapped[prefix + new] = value
        scope = [k for k in model_sd if k.startswith(prefix)]
    elif fmt == "sam2":
        prefix = _scope_prefix(model_sd, "image_encoder", "trunk.pos_embed")
        groups = ("image_encoder.",) + (SAM_HEADS if take_sam_heads and prefix else ())
        mapped = {}
        for key, value in sd.items():
            if key.startswith(groups):
                mapped[key[len("image_encoder."):] if not prefix else key] = value
            else:
                dropped[_group(key)] += 1
        scope = [k for k in model_sd if not prefix or k.startswith(groups)]
        # RSAM-only parts of the prompt encoder (text PE) have no SAM 2.1 counterpart
        scope = [k for k in scope if "description_pe" not in k]
    else:
        mapped = {}
        for key, value in sd.items():
            if _is_leftover(key) and key not in model_sd:
                dropped[_group(key)] += 1
            else:
                mapped[key] = value
        scope = list(model_sd)
        if dropped:
            fmt = "rsam-official"

    unexpected = [k for k in mapped if k not in model_sd]
    missing = [k for k in scope if k not in mapped]
    mismatched = [k for k in mapped if k in model_sd and mapped[k].shape != model_sd[k].shape]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (not in the model): {_listing(unexpected)}")
    if missing and strict:
        problems.append(f"{len(missing)} missing keys (in the model, not in the checkpoint): {_listing(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + _listing(
            f"{k}: model expects {tuple(model_sd[k].shape)}, checkpoint has {tuple(mapped[k].shape)}"
            for k in mismatched))
    if problems:
        raise CheckpointError(f"{source} ({fmt} format) does not fit the model:\n  " + "\n  ".join(problems))

    # all checks done: this cannot fail half-way
    model.load_state_dict(mapped, strict=False)
    report = LoadReport(source=source, format=fmt, loaded=sorted(mapped), dropped=dict(dropped), missing=missing)
    if dropped:
        what = {"rsam-official": "official RSAM video-only leftovers", "sam2": "SAM 2.1 groups not used by RSAM",
                "bert": "BERT parts not used by RSAM"}[fmt]
        log.info("%s: loaded %d tensors; ignored %s: %s", source, len(mapped), what, _format_groups(dropped))
    if missing:
        log.warning("%s: %d model keys not in the checkpoint (strict=False): %s", source, len(missing),
                    _listing(missing))
    return report


def _bert_drop_group(key: str) -> str:
    key = key[len("bert."):] if key.startswith("bert.") else key
    if key.startswith("cls."):
        return "cls"
    if key.startswith("pooler."):
        return "pooler"
    return key.rsplit(".", 1)[-1]  # position_ids / token_type_ids


def _check_bert_config(model: nn.Module, prefix: str, config: Optional[dict], source: str) -> None:
    """Compare an HF config.json with the model's BERT before looking at tensors: clearer than shape errors."""
    if config is None:
        return
    bert = model.get_submodule(prefix.rstrip(".")) if prefix else model
    ours = getattr(bert, "config", None)
    if ours is None:
        return
    diffs = [f"{name}: model {getattr(ours, name)}, config.json {config[name]}"
             for name in BERT_STRUCTURE_FIELDS if name in config and getattr(ours, name, None) != config[name]]
    if diffs:
        raise CheckpointError(f"{source}/config.json describes a different BERT: " + "; ".join(diffs))


def _listing(items, limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _format_groups(groups: Mapping[str, int]) -> str:
    return ", ".join(f"{g} ({n})" for g, n in sorted(groups.items()))
