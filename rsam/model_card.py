"""The ``README.md`` model card of a pretrained directory (:mod:`rsam.pretrained`).

Hub model cards are Markdown with YAML front matter; the Hub reads ``library_name``, ``license``, ``tags``,
``pipeline_tag`` and ``datasets`` from it. The body says what the model is, how to load it, its metrics (when
known, with their metric convention), the training data, the recipe (read from the training config: resolution,
architecture, tokenizer, epochs, batch size, learning rates) and the licence. Everything here is plain string
formatting.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, List, Mapping, Optional, Sequence

__all__ = ["render_model_card", "normalise_metrics"]

BASE_TAGS = ("rsam", "referring-image-segmentation", "remote-sensing", "sam2", "bert", "image-segmentation")
LICENCE_TEXT = (
    "The code is Apache-2.0. The weights derive from SAM 2.1 (Apache-2.0) and BERT (Apache-2.0) where the "
    "recipe starts from them, and from the training data: check the dataset's own terms before redistributing "
    "or using the model commercially.")
MAX_METRIC_ROWS = 40


def normalise_metrics(metrics: Optional[Mapping]) -> tuple[dict, dict]:
    """``(numbers, context)`` from a flat ``{name: number}`` dict or a ``training/eval.py`` metrics.json record.

    Integers (counts) stay integers; the card shows fractions as percentages (rsam/evaluation/metrics.py
    ``format_metric_value``), ``config.json`` keeps them as they are.

    ``context`` holds split / convention / resolution / checkpoint when the record names them.
    """
    if not metrics:
        return {}, {}
    metrics = dict(metrics)
    context = {k: metrics[k] for k in ("split", "convention", "resolution", "source") if k in metrics}
    inner = metrics.get("metrics") if isinstance(metrics.get("metrics"), Mapping) else metrics
    numbers = {str(k): v for k, v in inner.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return numbers, context


def _convention(cfg: Mapping, context: Mapping) -> str:
    """The metric convention of the card's numbers: the one the metrics record names (``training/eval.py``
    records it), else "not recorded" with the one the training config validates with (``trainer.metric_convention``,
    else the default of rsam/evaluation/metrics.py), which is what the run's own validation numbers used."""
    if "convention" in context:
        return str(context["convention"])
    from rsam.evaluation.metrics import DEFAULT_CONVENTION

    configured = _get(cfg, "trainer", "metric_convention")
    return f"not recorded (the training config's is {configured or DEFAULT_CONVENTION})"


def _yaml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"  # JSON strings are valid YAML scalars


def _get(node: Any, *path: str, default: Any = None) -> Any:
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _datasets(cfg: Mapping) -> List[str]:
    """'format: root name' of every training dataset in the config (single or mixed)."""
    train = _get(cfg, "data", "train", default={}) or {}
    found = []

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            if "root" in node and isinstance(node.get("root"), str):
                name = os.path.basename(os.path.normpath(node["root"])) or node["root"]
                fmt = node.get("format") or "risors"
                found.append(f"{name} ({fmt} format)")
                return
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(train.get("dataset", train))
    return list(dict.fromkeys(found))


def _recipe_rows(cfg: Mapping, record: Mapping, num_params: Optional[int]) -> List[tuple]:
    model, tok = record["model"], record["tokenizer"]
    image = model.get("image_encoder") or {}
    trunk = image.get("trunk") or {}
    text = model.get("text_encoder") or {}
    # only the fields the config has: the image-encoder node differs between configs (explicit or zoo sizes)
    image_parts = [f"Hiera-{image['size']}" if image.get("size") else "Hiera"]
    image_parts += [f"{label} {value}" for label, value in (
        ("embed_dim", trunk.get("embed_dim")), ("stages", trunk.get("stages")),
        ("FPN d_model", image.get("d_model", _get(image, "neck", "d_model")))) if value is not None]
    text_parts = ["BERT"] + [f"{label} {value}" for label, value in (
        ("hidden", text.get("hidden_size")), ("layers", text.get("num_hidden_layers")),
        ("vocabulary", text.get("vocab_size"))) if value is not None]
    if "freeze_text_encoder" in model:
        text_parts.append("frozen" if model["freeze_text_encoder"] else "trained")
    rows = [
        ("network resolution", f"{model.get('image_size')} px (square)"),
        ("image encoder", ", ".join(image_parts)),
        ("text encoder", ", ".join(text_parts)),
        ("guidance layers", model.get("num_guidance_layers")),
        ("text padding mask", model.get("use_text_padding_mask")),
        ("tokenizer", f"{tok.get('mode')} mode, max {tok.get('max_tokens')} tokens"),
    ]
    rows = [(k, v) for k, v in rows if v is not None]
    if num_params:
        rows.append(("parameters", f"{num_params:,}"))
    scratch = cfg.get("scratch") or {}
    for key, label in (("num_epochs", "epochs"), ("train_batch_size", "images per GPU"),
                       ("max_exprs_per_image", "expressions per image"), ("base_lr", "base lr"),
                       ("vision_lr", "image encoder lr"), ("text_lr", "text encoder lr"),
                       ("fusion_lr", "fusion lr"), ("layer_decay", "layer decay"),
                       ("weight_decay", "weight decay"), ("negative_ratio", "no-target expressions per image")):
        if key in scratch:
            rows.append((label, scratch[key]))
    clip = _get(cfg, "optim", "gradient_clip")
    if clip is not None:
        rows.append(("gradient clipping", clip))
    amp = _get(cfg, "trainer", "amp")
    if isinstance(amp, Mapping) and "enabled" in amp:
        rows.append(("mixed precision", amp.get("dtype") if amp.get("enabled") else "off"))
    info = record.get("info") or {}
    for key in ("epoch", "step"):
        if key in info:
            rows.append((f"checkpoint {key}", info[key]))
    return rows


def render_model_card(
    cfg: Mapping,
    record: Mapping,
    metrics: Optional[Mapping] = None,
    num_params: Optional[int] = None,
    name: Optional[str] = None,
    license: str = "apache-2.0",
    data: Optional[str] = None,
    description: Optional[str] = None,
    tags: Sequence[str] = (),
    repo_id: Optional[str] = None,
) -> str:
    """The model card text.

    Args:
        cfg: the full (plain) training config: data and recipe come from it when present.
        record: what goes into ``config.json`` (``model``, ``tokenizer``, ``info``).
        metrics: see :func:`normalise_metrics`; None: the card says the model was not evaluated.
        name: the card's title (default "RSAM"); license: an SPDX-like Hub licence id.
        data: a sentence on the training data replacing the one derived from the config.
        description: an extra paragraph under the title. tags: added to the standard tags.
        repo_id: used in the loading example (default "<namespace>/<name>").
    """
    numbers, context = normalise_metrics(metrics)
    datasets = _datasets(cfg)
    all_tags = dict.fromkeys([*BASE_TAGS, *tags])
    front = ["---", "library_name: rsam", f"license: {license}", f"tags: {_yaml_list(all_tags)}",
             "pipeline_tag: image-segmentation", "---", ""]
    title = name or "RSAM"
    where = repo_id or "<namespace>/<name>"
    lines = [
        f"# {title}", "",
        "RSAM (Zhao et al., *Remote Sensing* 17(24):3960, 2025): referring remote-sensing image segmentation. "
        "An aerial or satellite image and a sentence (\"the white storage tank at the bottom left\") in, a mask "
        "of the object the sentence refers to out, or \"no target\" when nothing matches. SAM 2.1 Hiera image "
        "encoder, BERT text encoder, two-way text/image guidance, SAM 2 mask decoder.", "",
    ]
    if description:
        lines += [description, ""]
    lines += [
        "## Use", "",
        "```python",
        "from rsam import RSAMPredictor",
        "",
        f'predictor = RSAMPredictor.from_pretrained("{where}")   # or a local directory',
        'predictor.set_image("scene.jpg")',
        'for r in predictor.predict(["the white storage tank at the bottom left"]):',
        "    print(r.mask.shape, r.iou_pred, r.object_score, r.no_target)",
        "```", "",
        "```bash",
        f'rsam-predict --checkpoint {where} --image scenes/ --text "the largest building" --out out/',
        "```", "",
        "## Metrics", "",
    ]
    if numbers:
        context = {**context, "convention": _convention(cfg, context)}
        lines += ["Evaluation: " + ", ".join(f"{k} {v}" for k, v in context.items()) + ".", ""]
        from rsam.evaluation.metrics import format_metric_value

        lines += ["Rates in % (as RRSIS papers print them; `info.metrics` in config.json keeps fractions).", ""]
        lines += ["| metric | value |", "|---|---|"]
        shown = list(numbers.items())[:MAX_METRIC_ROWS]
        lines += [f"| {k} | {format_metric_value(v)} |" for k, v in shown]
        if len(numbers) > MAX_METRIC_ROWS:
            lines.append(f"| ... | {len(numbers) - MAX_METRIC_ROWS} more in config.json (`info.metrics`) |")
    else:
        lines.append("Not evaluated: no metrics were given when this directory was written "
                     "(`rsam-export --metrics metrics.json` adds them).")
    lines += ["", "## Training data", ""]
    if data:
        lines.append(data)
    elif datasets:
        lines.append("Trained on " + ", ".join(datasets) + ".")
    else:
        lines.append("Unknown: the training config was not available when this directory was written.")
    lines += ["", "## Recipe", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _recipe_rows(cfg, record, num_params)]
    lines += ["", "## Files", "",
              "`config.json` (model and tokenizer config), `model.safetensors` (weights, no pickle), "
              "`vocab.txt` (BERT WordPiece vocabulary), `README.md` (this card).", "",
              "## Licence", "", f"`{license}`. {LICENCE_TEXT}", "",
              "## Citation", "", "```bibtex",
              "@Article{zhao2025rsam,",
              "    AUTHOR = {Zhao, Zilong and Xu, Xin and Huang, Bingxin and Chen, Hongjia and Pu, Fangling},",
              "    TITLE = {RSAM: Vision-Language Two-Way Guidance for Referring Remote Sensing Image Segmentation},",
              "    JOURNAL = {Remote Sensing}, VOLUME = {17}, YEAR = {2025}, NUMBER = {24}, ARTICLE-NUMBER = {3960},",
              "    DOI = {10.3390/rs17243960}",
              "}", "```", ""]
    return "\n".join(front + lines)
