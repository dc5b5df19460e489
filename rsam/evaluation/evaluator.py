"""The evaluation loop: a model over a loader -> referring-segmentation metrics, optionally distributed.

    loader = build_eval_loader(EvalDataset(dataset), EvalCollator(collate), batch_size=8, rank=r, world_size=w)
    result = evaluate(model, loader, convention="official", resolution="network", device="cuda")
    print(result.metrics["mIoU"], result.expressions_per_s)

Two scoring resolutions:

* ``network`` (official): the (R, R) logits against the ground truth resized to R by the dataset's eval
  transform -- what the official code and the LAVT lineage report.
* ``original``: the low-resolution (R/4) logits are upsampled bilinearly in one step to each image's original
  (H, W) and scored against the ground-truth masks decoded at that size (needs :class:`EvalDataset` with
  ``original_masks=True``, which decodes them in the loader workers).

Exactness under distribution comes from the pieces this loop is built from: the loader's sampler shards images
without padding (``rsam.data.risors.ShardedEvalSampler``) and :class:`rsam.evaluation.metrics.MetricAccumulator`
gathers per-expression statistics, de-duplicates them by sample id and sorts them, so 1 and k processes give
bit-identical numbers when each image is computed the same way (same batch composition; batch size 1 always).

Callbacks see every scored expression (:class:`ScoredExpression`); :class:`PredictionWriter` and
:class:`VisualWriter` write masks, scores and pictures, and :func:`rescore` recomputes the metrics from written
predictions without a model.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from rsam.data.batch import Batch, ImageSample
from rsam.evaluation.metrics import MetricAccumulator, MetricConvention, expression_stats

__all__ = [
    "RESOLUTIONS",
    "EvalDataset",
    "EvalCollator",
    "EvalExtras",
    "EvalResult",
    "ScoredExpression",
    "evaluate",
    "PredictionWriter",
    "VisualWriter",
    "rescore",
    "original_gt_masks",
    "mask_file_name",
]

log = logging.getLogger(__name__)

RESOLUTIONS = ("network", "original")
PREDICTIONS_JSON = "predictions.json"


# ------------------------------------------------------------------------------------------------------------
# what the loader carries besides the Batch


def original_gt_masks(dataset, name: str, annotation_ids: Sequence[int], size: Tuple[int, int]) -> torch.Tensor:
    """Ground truth of ``annotation_ids`` of image ``name`` at its original ``size`` (h, w) -> bool (k, h, w).

    Negative ids (no-target expressions drawn from other images) and empty records give all-False masks.
    ``dataset`` is a :class:`rsam.data.risors.RISORSDataset` (its reader and empty-record rule are used).
    """
    h, w = size
    out = torch.zeros((len(annotation_ids), h, w), dtype=torch.bool)
    wanted = {aid for aid in annotation_ids if aid >= 0}
    if not wanted:
        return out
    anns = {a.index: a for a in dataset.reader.load_annotations(name, keep_empty=dataset.keep_empty)}
    rows = [(j, anns[aid]) for j, aid in enumerate(annotation_ids) if aid >= 0 and not anns[aid].empty]
    if rows:
        decoded = dataset.reader.decode_masks(name, [a for _, a in rows])
        out[[j for j, _ in rows]] = torch.from_numpy(np.ascontiguousarray(decoded)).bool()
    return out


class EvalDataset(Dataset):
    """Wraps an evaluation dataset of :class:`ImageSample`: item -> ``(sample, extras)``.

    ``extras`` holds what a :class:`Batch` does not: the expressions' text, and with ``original_masks`` the
    ground truth at the original image size (decoded here, i.e. in the loader workers).
    """

    def __init__(self, dataset, original_masks: bool = False):
        self.dataset = dataset
        self.original_masks = bool(original_masks)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample: Optional[ImageSample] = self.dataset[index]
        if sample is None:  # a bad image skipped by the dataset (skip_bad_samples)
            return None
        extras = {"descriptions": list(sample.descriptions)}
        if self.original_masks:
            extras["masks"] = original_gt_masks(self.dataset, sample.name, sample.annotation_ids, sample.orig_size)
        return sample, extras


@dataclass
class EvalExtras:
    """Per-expression extras in :class:`Batch` order: texts, and original-size GT masks (or None)."""

    texts: List[str]
    masks: Optional[List[torch.Tensor]]


class EvalCollator:
    """Collate for :class:`EvalDataset` items: ``(Batch, EvalExtras)``, or None when every image was skipped."""

    def __init__(self, collate: Callable[[Sequence[ImageSample]], Optional[Batch]]):
        self.collate = collate

    def __call__(self, items):
        items = [it for it in items if it is not None]
        batch = self.collate([s for s, _ in items]) if items else None
        if batch is None:
            return None
        texts, masks = {}, {}
        for sample, extras in items:
            for j, aid in enumerate(sample.annotation_ids):
                key = (sample.name, int(aid))
                texts[key] = extras["descriptions"][j]
                if "masks" in extras:
                    masks[key] = extras["masks"][j]
        ids = [tuple(s) for s in batch.sample_ids]
        return batch, EvalExtras([texts[k] for k in ids], [masks[k] for k in ids] if masks else None)


# ------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class ScoredExpression:
    """One expression as scored (tensors on the CPU, at the scoring resolution)."""

    sample_id: Tuple[str, int]
    text: Optional[str]
    category: str
    is_negative: bool
    pred: torch.Tensor  # (h, w) bool
    gt: torch.Tensor  # (h, w) bool
    iou_pred: float
    object_score: float
    tp: int
    fp: int
    fn: int

    @property
    def iou(self) -> float:
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 0.0


@dataclass
class EvalResult:
    """metrics: identical on every rank. local_expressions: scored by this rank (before de-duplication)."""

    metrics: Dict[str, float]
    convention: MetricConvention
    resolution: str
    seconds: float
    local_expressions: int

    @property
    def expressions_per_s(self) -> float:
        return self.metrics["num_expressions"] / max(self.seconds, 1e-9)


def _split_item(item) -> Tuple[Optional[Batch], Optional[EvalExtras]]:
    if item is None:
        return None, None
    if isinstance(item, tuple):
        return item
    return item, None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    convention: Union[str, MetricConvention] = "official",
    resolution: str = "network",
    device: Union[None, str, torch.device] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[ScoredExpression], None]] = (),
    desc: str = "eval",
    group=None,
) -> EvalResult:
    """Run ``model`` over ``loader`` and compute the metrics (a collective when distributed).

    Args:
        model: an RSAM (called as ``model(images, expr_to_image, input_ids, attention_mask)``); put in eval mode.
        loader: yields :class:`Batch`, ``(Batch, EvalExtras)`` (from :class:`EvalCollator`) or None.
        convention: ``official`` / ``standard`` or a :class:`MetricConvention` (foreground rule and Pr@X rule).
        resolution: ``network`` or ``original`` (needs extras with original-size masks).
        device: where to run (default: the model's device).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None for full precision.
        progress: show a progress bar with expressions/s (rank 0 only).
        callbacks: called with every :class:`ScoredExpression` of this rank (costs a host sync per batch).
        group: process group for the metric gather (default: the world, when initialised).
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    convention = MetricConvention.get(convention)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    acc = MetricAccumulator(convention, group=group)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(total=total, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True, leave=False,
               file=sys.stdout, mininterval=1.0, unit="batch")
    local = 0
    start = time.perf_counter()
    for item in loader:
        batch, extras = _split_item(item)
        if batch is None:  # every image of the batch was skipped as bad input
            bar.update(1)
            continue
        batch = batch.to(device, non_blocking=True)
        with autocast:
            out = model(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
        if resolution == "network":
            scored = [(list(range(batch.num_expressions)), out.logits, batch.masks)]
        else:
            if extras is None or extras.masks is None:
                raise ValueError("resolution='original' needs the loader to carry original-size masks: wrap the "
                                 "dataset in EvalDataset(dataset, original_masks=True) and the collate in "
                                 "EvalCollator")
            scored = _original_resolution(batch, out.low_res_logits, extras.masks, device)
        for rows, logits, gt in scored:
            idx = torch.tensor(rows, device=device)
            ids = [batch.sample_ids[i] for i in rows]
            cats = [batch.categories[i] for i in rows]
            acc.update(logits, gt, ids, cats, batch.is_negative.index_select(0, idx))
            if callbacks:
                _run_callbacks(callbacks, rows, logits, gt, batch, out, extras, convention)
        local += batch.num_expressions
        bar.update(1)
        bar.set_postfix_str(f"{local * _world(group) / max(time.perf_counter() - start, 1e-9):.1f} expr/s")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    metrics = acc.compute() if _any_rank(local > 0, group) else None
    seconds = time.perf_counter() - start
    if metrics is None:
        raise ValueError(f"{desc}: no expression was evaluated (the split has no usable image, or every image "
                         "was skipped as bad input)")
    return EvalResult(metrics, convention, resolution, seconds, local)


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _any_rank(flag: bool, group) -> bool:
    if _world(group) == 1:
        return flag
    t = torch.tensor([int(flag)])
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return bool(t.item() > 0)


def _original_resolution(batch: Batch, low_res: torch.Tensor, masks: List[torch.Tensor], device: torch.device):
    """Per image: (expression rows, logits (k,1,H,W) upsampled from R/4 in one step, GT (k,H,W))."""
    groups = []
    owner = batch.expr_to_image.tolist()
    for b in range(batch.num_images):
        rows = [i for i, o in enumerate(owner) if o == b]
        if not rows:
            continue
        h, w = (int(v) for v in batch.orig_sizes[b].tolist())
        idx = torch.tensor(rows, device=device)
        logits = F.interpolate(low_res.index_select(0, idx).float(), size=(h, w), mode="bilinear",
                               align_corners=False)
        gt = torch.stack([masks[i] for i in rows]).to(device, non_blocking=True)
        if gt.shape[-2:] != (h, w):
            raise ValueError(f"image {batch.sample_ids[rows[0]][0]}: original-size masks are {tuple(gt.shape[-2:])}, "
                             f"the image is {(h, w)}")
        groups.append((rows, logits, gt))
    return groups


def _run_callbacks(callbacks, rows, logits, gt, batch: Batch, out, extras: Optional[EvalExtras],
                   convention: MetricConvention) -> None:
    stats = expression_stats(logits, gt, convention)
    pred = convention.foreground(logits[:, 0] if logits.dim() == 4 else logits).cpu()
    gt = gt.cpu()
    stats = {k: v.tolist() for k, v in stats.items()}
    iou = out.iou_pred[:, 0].float().cpu().tolist()
    score = out.object_score_logits[:, 0].float().cpu().tolist()
    negative = batch.is_negative.tolist()
    for j, i in enumerate(rows):
        expr = ScoredExpression(
            sample_id=tuple(batch.sample_ids[i]), text=extras.texts[i] if extras is not None else None,
            category=batch.categories[i], is_negative=bool(negative[i]), pred=pred[j], gt=gt[j],
            iou_pred=iou[i], object_score=score[i], tp=stats["tp"][j], fp=stats["fp"][j], fn=stats["fn"][j])
        for cb in callbacks:
            cb(expr)


# ------------------------------------------------------------------------------------------------------------
# writing predictions and pictures


def mask_file_name(sample_id: Tuple[str, int]) -> str:
    """``<image>_ann<k>.png`` for annotation k, ``<image>_neg<j>.png`` for the j-th drawn no-target expression."""
    name, aid = sample_id
    return f"{name}_ann{aid}.png" if aid >= 0 else f"{name}_neg{-1 - aid}.png"


class PredictionWriter:
    """Callback writing one PNG mask per expression (0/255, at the scoring resolution) and, on :meth:`close`,
    ``predictions.json`` with every expression's scores (gathered from all ranks; written by rank 0).

    The masks hold the binary prediction of the evaluation's convention, so :func:`rescore` reproduces the
    metrics exactly without a model.
    """

    def __init__(self, out_dir: str, meta: Optional[dict] = None):
        self.out_dir = out_dir
        self.meta = dict(meta or {})
        self.records: List[dict] = []
        os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)

    def __call__(self, e: ScoredExpression) -> None:
        from rsam.visualization import mask_to_png

        file = os.path.join("masks", mask_file_name(e.sample_id))
        mask_to_png(e.pred.numpy()).save(os.path.join(self.out_dir, file))
        self.records.append({
            "image": e.sample_id[0], "annotation_id": int(e.sample_id[1]), "expression": e.text,
            "category": e.category, "is_negative": e.is_negative, "mask": file,
            "height": int(e.pred.shape[0]), "width": int(e.pred.shape[1]),
            "iou_pred": e.iou_pred, "object_score": e.object_score, "no_target": e.object_score <= 0,
            "iou": e.iou, "tp": e.tp, "fp": e.fp, "fn": e.fn,
        })

    def close(self, metrics: Optional[Dict[str, float]] = None) -> Optional[str]:
        """Collective: gather the records on rank 0 and write the JSON there (returns its path on rank 0)."""
        parts = [self.records]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.records)
            if dist.get_rank() != 0:
                return None
        records = sorted((r for p in parts for r in p), key=lambda r: (r["image"], r["annotation_id"]))
        path = os.path.join(self.out_dir, PREDICTIONS_JSON)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**self.meta, "metrics": metrics, "predictions": records}, f, indent=1)
        return path


class VisualWriter:
    """Callback writing the first ``k`` expressions it sees as a TP/FP/FN error picture and a prediction overlay.

    ``image_loader(name) -> uint8 (H, W, 3)`` gives the original image; it is resized to the scoring resolution
    (the network input's size, or kept at the original size).
    """

    def __init__(self, out_dir: str, k: int, image_loader: Callable[[str], np.ndarray]):
        self.out_dir, self.k, self.image_loader = out_dir, int(k), image_loader
        self.written = 0
        os.makedirs(out_dir, exist_ok=True)

    def __call__(self, e: ScoredExpression) -> None:
        if self.written >= self.k:
            return
        from rsam.visualization import Caption, draw_errors, draw_masks

        image = self.image_loader(e.sample_id[0])
        h, w = e.pred.shape
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        stem = mask_file_name(e.sample_id)[:-4]
        status = "NO TARGET (object score <= 0)" if e.object_score <= 0 else "target"
        detail = (f"IoU {e.iou:.3f} | predicted IoU {e.iou_pred:.3f} | object score {e.object_score:+.2f} ({status})"
                  + (" | no-target expression" if e.is_negative else ""))
        text = e.text if e.text is not None else f"{e.sample_id}"
        draw_errors(image, e.pred.numpy(), e.gt.numpy(), text=f'"{text}"', detail=detail).save(
            os.path.join(self.out_dir, f"{stem}_errors.png"))
        draw_masks(image, [e.pred.numpy(), e.gt.numpy()],
                   [Caption(f'prediction: "{text}"', (255, 48, 48), detail),
                    Caption("ground truth", (40, 220, 60))],
                   title=f"{e.sample_id[0]} ({e.category})").save(os.path.join(self.out_dir, f"{stem}_overlay.png"))
        self.written += 1


# ------------------------------------------------------------------------------------------------------------
# re-scoring written predictions


def rescore(pred_dir: str, dataset, convention: Union[None, str, MetricConvention] = None) -> Dict[str, float]:
    """Recompute the metrics of ``<pred_dir>/predictions.json`` and its PNG masks against ``dataset``'s GT.

    Args:
        pred_dir: a ``--save-predictions`` folder.
        dataset: the evaluated split (a :class:`rsam.data.risors.RISORSDataset` with the same settings).
        convention: default the one recorded in the JSON. The masks are already binary, so only the Pr@X rule
            can change; the foreground threshold stays the recorded one.
    Returns:
        the metrics dict of :meth:`MetricAccumulator.compute` (equal to the evaluation's).
    """
    path = os.path.join(pred_dir, PREDICTIONS_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (write it with --save-predictions)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    recorded = data.get("convention", "official")
    convention = MetricConvention.get(convention or recorded)
    if convention.name != recorded:
        log.warning("rescoring masks binarised with the %r foreground rule under %r: only the Pr@X rule changes",
                    recorded, convention.name)
    resolution = data.get("resolution", "network")
    records = data["predictions"]
    if not records:
        raise ValueError(f"{path}: no predictions to rescore")
    index = {n: i for i, n in enumerate(dataset.names)}
    by_image: Dict[str, List[dict]] = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r)
    acc = MetricAccumulator(convention)
    # A binary mask as logits: 1.0 / 0.0 are foreground / background under both conventions' rules
    # (logit >= 0.5 and logit > 0), so the accumulator reproduces the recorded foreground exactly.
    for name, recs in by_image.items():
        if name not in index:
            raise KeyError(f"{path}: image {name!r} is not in the dataset split ({dataset.root})")
        aids = [int(r["annotation_id"]) for r in recs]
        if resolution == "original":
            size = (recs[0]["height"], recs[0]["width"])
            gt = original_gt_masks(dataset, name, aids, size)
        else:
            sample = dataset[index[name]]
            if sample is None:
                raise ValueError(f"{path}: image {name!r} could not be loaded from the dataset")
            where = {int(a): j for j, a in enumerate(sample.annotation_ids)}
            missing = [a for a in aids if a not in where]
            if missing:
                raise KeyError(f"{path}: image {name!r} has no expressions {missing} in the dataset (different "
                               "negative_ratio or seed than the evaluation?)")
            gt = sample.masks[[where[a] for a in aids]]
        preds = []
        for r in recs:
            file = os.path.join(pred_dir, r["mask"])
            try:
                preds.append(torch.from_numpy(np.asarray(Image.open(file).convert("L")) > 127))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{file}: cannot read the mask ({exc})") from None
        pred = torch.stack(preds)
        if pred.shape != gt.shape:
            raise ValueError(f"{path}: masks of {name!r} are {tuple(pred.shape[1:])}, the ground truth is "
                             f"{tuple(gt.shape[1:])} (resolution {resolution!r})")
        acc.update(pred.float(), gt, [(name, a) for a in aids], [r["category"] for r in recs],
                   torch.tensor([bool(r["is_negative"]) for r in recs]))
    return acc.compute()
