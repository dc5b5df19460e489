"""Check this implementation against a golden file made with the official RSAM code.

    python -m rsam.tools.verify_reference tests/reference/golden_tiny.pt
    python -m rsam.tools.verify_reference tests/reference/golden_loss_metrics.pt

The kind of file is recognised from its keys:

* ``state_dict`` + ``inputs`` + ``outputs`` (a forward pass, e.g. ``golden_tiny.pt``): build our model from the
  file's own ``config`` (official model yaml + BERT json + constructor defaults, translated generically by
  :func:`official_to_model_node`), load its ``state_dict`` through :func:`rsam.checkpoint.load_weights` (which
  drops the official video-only leftovers), run the stored (already normalised) inputs in float32 eval mode with the
  official-compatible switches (no text padding mask), and compare every stored tensor that has a
  counterpart here, plus the per-expression ``batch_composition`` runs;
* ``loss`` + ``metrics`` (``golden_loss_metrics.pt``): handed to
  :func:`rsam.tools.verify_loss_metrics.check_loss_metrics`.

Prints one row per tensor (max abs error, tolerance, PASS/FAIL) and exits with status 1 if any row fails
(2 if the file cannot be used at all).
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from rsam.checkpoint import CheckpointError, read_torch_file
from rsam.tools.intermediates import capture_intermediates, record_heads

# (name, shape or what is counted, max abs error or count, tolerance, result)
Row = Tuple[str, str, float, float, str]

FEATURE_TOL = 1e-4  # features, tokens, PEs, mask logits, IoU predictions (tests/reference/README.md)
OBJECT_SCORE_TOL = 2e-4  # the golden file's object-score head was scaled by ~29
NO_OBJ_SCORE = -1024.0

# Official class / factory -> ours. Targets not listed here must name our own modules already (the image
# encoder's classes keep SAM 2's module paths).
TARGETS = {
    "training.model.rsam.RSAM": "rsam.modeling.rsam.RSAM",
    "rsam.modeling.bert.bert.built_bert": "rsam.modeling.text_encoder.build_bert",
}

# Official RSAM switches whose value this implementation hard-wires (the only ones that change the image-only
# forward pass). A golden file made with another value cannot be reproduced.
REQUIRED_SWITCHES = {
    "num_maskmem": 0,
    "use_high_res_features_in_sam": True,
    "multimask_output_in_sam": False,
    "iou_prediction_use_sigmoid": True,
    "pred_obj_scores": True,
    "pred_obj_scores_mlp": True,
    "use_mask_input_as_output_without_sam": False,
    "prob_to_use_pt_input_for_eval": 0.0,
    "prob_to_use_box_input_for_eval": 0.0,
    "prob_to_use_descript_input_for_eval": 1.0,
}
# Where each of our RSAM constructor arguments is stated in a golden config: (ours, section, entry, name).
#   "yaml":       model_yaml[name]
#   "defaults":   constructor_defaults_not_set_by_the_yaml[<class>][name]
#   "hardcoded":  hardcoded_in_official_code[entry], a scalar or "name=value" pairs in prose
# Every source that states a value must agree; None as our argument = the value we hard-wire (see REQUIRED).
ARG_SOURCES = [
    ("image_size", "yaml", None, "image_size"),
    ("freeze_text_encoder", "yaml", None, "freeze_text_encoder"),
    ("backbone_stride", "defaults", None, "backbone_stride"),
    ("backbone_stride", "hardcoded", "backbone_stride", None),
    ("num_guidance_layers", "defaults", None, "num_twgt"),
    ("num_guidance_layers", "hardcoded", "num_twgt", None),
    ("num_guidance_layers", "hardcoded", "description_transformer", "depth"),
    ("num_heads", "hardcoded", "description_transformer", "num_heads"),
    ("num_heads", "hardcoded", "sam_mask_decoder.transformer", "num_heads"),
    ("mlp_dim", "hardcoded", "description_transformer", "mlp_dim"),
    ("mlp_dim", "hardcoded", "sam_mask_decoder.transformer", "mlp_dim"),
    ("num_multimask_outputs", "hardcoded", "sam_mask_decoder", "num_multimask_outputs"),
    ("iou_head_hidden_dim", "hardcoded", "sam_mask_decoder", "iou_head_hidden_dim"),
    ("max_text_tokens", "hardcoded", "sam_prompt_encoder", "max_text_position_embeddings"),
    (None, "hardcoded", "description_transformer", "attention_downsample_rate"),
    (None, "hardcoded", "sam_mask_decoder.transformer", "depth"),
    (None, "hardcoded", "sam_mask_decoder.transformer", "attention_downsample_rate"),
    (None, "hardcoded", "sam_mask_decoder", "iou_head_depth"),
    (None, "hardcoded", "sam_prompt_encoder", "mask_in_chans"),
]
REQUIRED = {
    ("description_transformer", "attention_downsample_rate"): 1,
    ("sam_mask_decoder.transformer", "depth"): 2,
    ("sam_mask_decoder.transformer", "attention_downsample_rate"): 2,
    ("sam_mask_decoder", "iou_head_depth"): 3,
    ("sam_prompt_encoder", "mask_in_chans"): 16,
}

# Reference names that are the same tensor as one of ours under another name.
ALIASES = {
    "heads.low_res_multimasks": "heads.low_res_masks",
    "heads.high_res_multimasks": "heads.high_res_masks",
    "model_out.pred_masks": "heads.low_res_masks",
    "model_out.pred_masks_high_res": "heads.high_res_masks",
    "model_out.multistep_pred_ious0": "heads.ious",
    "model_out.multistep_object_score_logits0": "heads.object_score_logits",
    "model_out.description_inputs": "text_proj",
}
# Reference outputs without a counterpart here, with the reason.
NO_COUNTERPART = {
    "obj_ptr_proj": "video object pointer (not built)",
    "heads.obj_ptr": "video object pointer (not built)",
    "loss.": "checked by verify_loss_metrics on golden_loss_metrics.pt",
}
# Encodings that are identical for every sample: we compute them once and broadcast.
BROADCAST_OK = re.compile(r"^(description_pe|fusion\.in_text_pe|dense_pe|prompt\.(dense|sparse)|"
                          r"neck\.pos\d|image_encoder\.vision_pos_enc\d)$")
GATED = ("heads.low_res_masks", "heads.high_res_masks")


# ----------------------------------------------------------------------------------------------------------
# building our model from the golden file's config


def _class_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _accepted_args(target: str) -> Optional[set]:
    from rsam.checkpoint.stored_config import MODEL_TARGETS, stored_builder

    # the golden file is data like any checkpoint: only RSAM's own model parts may be named
    if target not in MODEL_TARGETS:
        raise ValueError(f"config: _target_ {target!r} is not one of RSAM's model parts")
    params = inspect.signature(stored_builder(target)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None  # accepts anything
    return set(params)


def _translate_node(node: Any, defaults: Dict[str, dict], notes: List[str], where: str) -> Any:
    """Recursively map official ``_target_`` names to ours and add the official constructor defaults that our
    constructors accept (defaults they do not accept only tune caching/loading and are listed in ``notes``)."""
    if isinstance(node, list):
        return [_translate_node(v, defaults, notes, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out = {k: _translate_node(v, defaults, notes, f"{where}.{k}") for k, v in node.items()}
    if "_target_" in out:
        target = TARGETS.get(out["_target_"], out["_target_"])
        out["_target_"] = target
        accepted = _accepted_args(target)
        for key, value in defaults.get(_class_name(target), {}).items():
            if key in out:
                continue
            if accepted is None or key in accepted:
                out[key] = value
            else:
                notes.append(f"{where}: official default {key}={value!r} has no counterpart here (ignored)")
    return out


def _number(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return None  # symbolic (d_model, S/16, ...)


def _hardcoded_value(hardcoded: Dict[str, Any], entry: str, name: Optional[str]) -> Any:
    """Value of ``name`` in ``hardcoded_in_official_code[entry]`` (the entry itself when ``name`` is None).

    Entries are matched on their first word, so ``"num_twgt (description_transformer depth)"`` is ``num_twgt``.
    """
    for key, text in hardcoded.items():
        if key.split(" ", 1)[0] != entry:
            continue
        if name is None:
            return text if isinstance(text, (int, float)) and not isinstance(text, bool) else None
        for found, raw in re.findall(r"(\w+)=([-\w.]+)", str(text)):
            if found == name:
                return _number(raw)
    return None


def official_to_model_node(config: Dict[str, Any], notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Translate a golden file's ``config`` into our Hydra ``model:`` node (``_target_: rsam.modeling.rsam.RSAM``).

    Uses only what the file states: ``model_yaml`` (the official ``trainer.model`` node), ``bert_json`` (the
    text encoder's config), ``constructor_defaults_not_set_by_the_yaml`` and ``hardcoded_in_official_code``.
    Raises ``ValueError`` naming the setting if the file uses an official switch this implementation does not
    have. ``notes`` collects human-readable remarks (ignored defaults).
    """
    from omegaconf import OmegaConf

    notes = [] if notes is None else notes
    for key in ("model_yaml", "bert_json"):
        if key not in config:
            raise KeyError(f"golden config has no {key!r} entry (has {sorted(config)})")
    yaml_node = OmegaConf.to_container(OmegaConf.create(config["model_yaml"]), resolve=True)
    defaults_by_class: Dict[str, dict] = {}
    for owner, values in config.get("constructor_defaults_not_set_by_the_yaml", {}).items():
        defaults_by_class.setdefault(owner.split(" ", 1)[0], {}).update(values or {})
    rsam_defaults = {**defaults_by_class.get("SAM2Base", {}), **defaults_by_class.get("RSAM", {})}
    hardcoded = config.get("hardcoded_in_official_code", {})

    for name, required in REQUIRED_SWITCHES.items():
        value = yaml_node.get(name, rsam_defaults.get(name, required))
        if value != required:
            raise ValueError(f"golden config: model_yaml {name}={value!r} is not supported "
                             f"(this implementation hard-wires {name}={required!r})")

    args: Dict[str, Any] = {}
    stated_by: Dict[str, str] = {}
    for ours, section, entry, name in ARG_SOURCES:
        if section == "yaml":
            value, where = yaml_node.get(name), f"model_yaml {name}"
        elif section == "defaults":
            value, where = rsam_defaults.get(name), f"constructor default {name}"
        else:
            value = _hardcoded_value(hardcoded, entry, name)
            where = f"hardcoded_in_official_code[{entry}]" + (f" {name}" if name else "")
        if value is None:
            continue
        if ours is None:
            required = REQUIRED[(entry, name)]
            if value != required:
                raise ValueError(f"golden config: {where}={value!r} is not supported "
                                 f"(this implementation hard-wires {required!r})")
        elif ours in args and args[ours] != value:
            raise ValueError(f"golden config: {stated_by[ours]}={args[ours]!r} but {where}={value!r}; "
                             f"this implementation has one {ours} for both")
        else:
            args[ours], stated_by[ours] = value, where
    if "image_size" not in args:
        raise KeyError("golden config: model_yaml states no image_size")
    for ours in dict.fromkeys(a for a, *_ in ARG_SOURCES if a is not None):
        if ours not in args:
            notes.append(f"{ours}: not stated in the golden config, using this implementation's default")

    image_encoder = yaml_node.get("image_encoder")
    if not isinstance(image_encoder, dict):
        raise KeyError("golden config: model_yaml has no image_encoder node")
    target = yaml_node.get("_target_", "training.model.rsam.RSAM")
    return {
        "_target_": TARGETS.get(target, target),
        "image_encoder": _translate_node(image_encoder, defaults_by_class, notes, "image_encoder"),
        "text_encoder": {"_target_": TARGETS["rsam.modeling.bert.bert.built_bert"], **dict(config["bert_json"])},
        **args,
        # official behaviour: padded text tokens take part in the fusion
        "use_text_padding_mask": False,
    }


def build_reference_model(golden: Dict[str, Any], notes: Optional[List[str]] = None) -> torch.nn.Module:
    """Our model built from ``golden['config']`` and filled with ``golden['state_dict']``, float32, eval mode."""
    from rsam.checkpoint import build_stored, load_weights
    from rsam.checkpoint.stored_config import MODEL_TARGETS

    node = official_to_model_node(golden["config"], notes)
    model = build_stored(node, "the golden file", "config", allowed=MODEL_TARGETS)
    report = load_weights(model, golden["state_dict"], strict=True)
    if notes is not None:
        notes.append(f"state_dict: {report}")
    return model.float().eval()


# ----------------------------------------------------------------------------------------------------------
# comparisons


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def compare(name: str, ours: Optional[torch.Tensor], ref: torch.Tensor) -> Row:
    """One row: max |ours - ref| against the tolerance for ``name``; shape and dtype must match exactly
    (per-sample-identical encodings may be broadcast, see ``BROADCAST_OK``)."""
    tol = OBJECT_SCORE_TOL if "object_score_logits" in name else FEATURE_TOL
    if ours is None:
        return (name, _shape(ref), float("inf"), tol, "FAIL (not produced)")
    ours = ours.detach()
    if ours.shape != ref.shape:
        if not BROADCAST_OK.match(name) or ours.numel() > ref.numel():
            return (name, f"{_shape(ours)} != {_shape(ref)}", float("inf"), tol, "FAIL (shape)")
        try:
            ours = torch.broadcast_to(ours, ref.shape)
        except RuntimeError:
            return (name, f"{_shape(ours)} != {_shape(ref)}", float("inf"), tol, "FAIL (shape)")
    if ours.dtype != ref.dtype:
        return (name, _shape(ref), float("inf"), tol, f"FAIL (dtype {ours.dtype} != {ref.dtype})")
    err = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    if err != err:  # NaN
        err = float("inf")
    return (name, _shape(ref), err, tol, "PASS" if err <= tol else "FAIL")


def compare_gating(name: str, ours: torch.Tensor, ref: torch.Tensor) -> Row:
    """Exact check of the object-score gate: the same pixels hold exactly -1024."""
    if ours.shape != ref.shape:
        return (f"gate: {name}", f"{_shape(ours)} != {_shape(ref)}", float("inf"), 0.0, "FAIL (shape)")
    wrong = ((ours == NO_OBJ_SCORE) != (ref == NO_OBJ_SCORE)).sum().item()
    gated = int((ref.flatten(1) == NO_OBJ_SCORE).all(1).sum()) if ref.ndim > 1 else 0
    return (f"gate: {name} ({gated} of {ref.shape[0]} gated)", "pixels differing", float(wrong), 0.0,
            "PASS" if wrong == 0 else "FAIL")


def _no_counterpart(name: str) -> Optional[str]:
    for prefix, reason in NO_COUNTERPART.items():
        if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
            return reason
    return None


def _extra_outputs(model: torch.nn.Module, captured: Dict[str, torch.Tensor]) -> None:
    """Reference tensors that are not a module output: the trunk's absolute position embedding."""
    trunk = getattr(model.image_encoder, "trunk", None)
    stage0 = captured.get("trunk.stage0")
    if trunk is not None and hasattr(trunk, "_pos_embed") and stage0 is not None:
        captured["trunk.pos_embed"] = trunk._pos_embed(tuple(stage0.shape[-2:]))


def check_forward(golden: Dict[str, Any], notes: Optional[List[str]] = None) -> Tuple[List[Row], bool]:
    """Run the golden forward pass (and the per-expression runs) with our model; return (rows, all passed)."""
    for key in ("config", "state_dict", "inputs", "outputs"):
        if key not in golden:
            raise KeyError(f"golden file has no {key!r} entry (has {sorted(golden)})")
    model = build_reference_model(golden, notes)
    inputs = golden["inputs"]
    try:
        images = inputs["images"]
        expr_to_image = inputs["flat_obj_to_img_idx"].long()
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    except KeyError as exc:
        raise KeyError(f"golden inputs: missing {exc.args[0]!r} (has {sorted(inputs)})") from None

    rows: List[Row] = []
    with torch.no_grad(), capture_intermediates(model) as captured:
        # the reference inputs are normalised already: past RSAM.preprocess, straight into the encoder
        features = model.encode_image(images.float(), normalized=True)
        record_heads(captured, model.decode(features, expr_to_image, input_ids, attention_mask))
        _extra_outputs(model, captured)
        for name in sorted(golden["outputs"]):
            ref = golden["outputs"][name]
            if not isinstance(ref, torch.Tensor):
                continue
            reason = _no_counterpart(name)
            if reason is not None:
                rows.append((name, _shape(ref), float("nan"), float("nan"), f"n/a ({reason})"))
                continue
            ours = captured.get(ALIASES.get(name, name))
            rows.append(compare(name, ours, ref))
            if name in GATED and ours is not None:
                rows.append(compare_gating(name, ours, ref))

        rows += _check_batch_composition(model, golden, features, expr_to_image, captured)
    ok = all(r[-1] == "PASS" or r[-1].startswith("n/a") for r in rows)
    return rows, ok


def _check_batch_composition(model, golden, features, expr_to_image, captured) -> List[Row]:
    """Each expression alone and unpadded: image features computed once, then decoded one expression at a time."""
    solo = golden.get("batch_composition") or {}
    indices = sorted({int(m.group(1)) for k in solo for m in [re.match(r"expr(\d+)\.", k)] if m})
    if not indices:
        return []
    rows: List[Row] = []
    for j in indices:
        ids = solo[f"expr{j}.input_ids"]
        ids = ids[None] if ids.ndim == 1 else ids
        captured.clear()
        model.decode(features, expr_to_image[j : j + 1], ids, torch.ones_like(ids))
        for key in sorted(solo):
            if not key.startswith(f"expr{j}.") or key.endswith(".input_ids"):
                continue
            name = key.split(".", 1)[1]
            rows.append(compare(f"batch_composition.{key}", captured.get(name), solo[key]))
    return rows


# ----------------------------------------------------------------------------------------------------------
# dispatch and CLI


def file_kind(golden: Dict[str, Any]) -> str:
    """``"forward"`` or ``"loss_metrics"``, from the keys of a golden file."""
    if not isinstance(golden, dict):
        raise KeyError(f"a golden file holds a dict, this one holds {type(golden).__name__}")
    if {"state_dict", "inputs", "outputs"} <= set(golden):
        return "forward"
    if {"loss", "metrics"} <= set(golden):
        return "loss_metrics"
    raise KeyError("unknown golden file: expected keys state_dict/inputs/outputs (a forward pass) or "
                   f"loss/metrics (loss and metrics), found {sorted(golden)}")


def check_reference(golden: Dict[str, Any], notes: Optional[List[str]] = None) -> Tuple[List[Row], bool]:
    """Check any golden file; returns (rows, ok). Loss/metrics files return the rows of verify_loss_metrics."""
    if file_kind(golden) == "loss_metrics":
        from rsam.tools.verify_loss_metrics import check_loss_metrics  # imported lazily: other dependencies

        return check_loss_metrics(golden)
    return check_forward(golden, notes)


def format_rows(rows: Sequence[Row]) -> str:
    width = max([len(r[0]) for r in rows] + [4])
    shape_width = max([len(r[1]) for r in rows] + [5])
    lines = [f"{'name':<{width}}  {'shape':<{shape_width}}  {'max abs err':>11}  {'tol':>8}  result"]
    for name, shape, err, tol, result in rows:
        err_s = "-" if err != err else f"{err:11.2e}"
        tol_s = "-" if tol != tol else f"{tol:8.0e}"
        lines.append(f"{name:<{width}}  {shape:<{shape_width}}  {err_s:>11}  {tol_s:>8}  {result}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="golden .pt file (golden_tiny.pt or golden_loss_metrics.pt)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 reproduces the reference machine's reduction order best)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        golden = read_torch_file(args.file)
    except (OSError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    notes: List[str] = []
    try:
        kind = file_kind(golden)
        rows, ok = check_reference(golden, notes)
    except (KeyError, ValueError) as exc:
        print(f"error: {args.file}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if kind == "loss_metrics":
        from rsam.tools.verify_loss_metrics import format_rows as format_loss_rows

        print(format_loss_rows(rows))
        failed = sum(r[-1] != "PASS" for r in rows)
    else:
        for note in notes:
            print(f"note: {note}")
        print(format_rows(rows))
        failed = sum(not (r[-1] == "PASS" or r[-1].startswith("n/a")) for r in rows)
    checked = sum(not r[-1].startswith("n/a") for r in rows)
    print(f"{args.file}: {checked - failed}/{checked} checks passed" + ("" if ok else f", {failed} FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
