"""The evaluation engine: a model over an evaluation loader -> referring-segmentation metrics, distributed or not.

Every evaluation of the project runs here: the trainer's validation and test, ``training/eval.py`` and
``benchmarks/bench_eval.py`` (which times :func:`eval_step`, the forward this loop runs).

    evaluator = Evaluator(dataset, collate, batch_size=8, convention="standard")    # the loader is built once
    result = evaluator.run(model, callbacks=[PredictionWriter("preds/")])
    print(result.metrics["mIoU"], result.expressions_per_s)

Two scoring resolutions:

* ``network`` (official): the (R, R) logits against the ground truth resized to R by the dataset's eval
  transform -- what the official code and the LAVT lineage report;
* ``original``: the low-resolution (R/4) logits are upsampled bilinearly in one step to each image's original
  (H, W) and scored against the ground-truth masks decoded at that size (in the loader workers).

Exact under distribution: the loader shards images without padding (:class:`rsam.data.samplers.ShardedEvalSampler`)
and :class:`rsam.evaluation.per_expression.ExpressionCollector` gathers per-expression statistics, de-duplicates
them by sample id and sorts them, so 1 and k processes give bit-identical numbers when each image is computed the
same way. The gathered statistics come back with the metrics (:attr:`EvalResult.expressions`), for
``per_expression.jsonl``.

Each expression's statistics are computed once per batch, on the device, and shared by the metrics and the
callbacks.

Callbacks see every scored expression as a :class:`ScoredExpression` (:mod:`rsam.evaluation.writers` has the
ones that write masks, pictures and TensorBoard overlays). A callback with a true ``done`` attribute is skipped;
when every callback is done the loop stops paying for them (they cost a host sync per batch).
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsam import distributed
from rsam.data.batch import Batch
from rsam.data.loaders import build_eval_loader
from rsam.evaluation.inputs import EvalCollator, EvalDataset, EvalExtras
from rsam.evaluation.metrics import DEFAULT_CONVENTION, MetricConvention, expression_stats
from rsam.evaluation.per_expression import ExpressionCollector, ExpressionTable

__all__ = ["RESOLUTIONS", "Evaluator", "EvalResult", "ScoredExpression", "evaluate", "eval_step"]

RESOLUTIONS = ("network", "original")


@dataclass
class ScoredExpression:
    """One expression as scored (tensors on the CPU; pred / gt at the scoring resolution).

    image (3, R, R) uint8 is the network input it was predicted from.
    """

    sample_id: Tuple[str, int]
    text: Optional[str]
    category: str
    is_negative: bool
    image: torch.Tensor
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
    """metrics: identical on every rank. local_expressions: scored by this rank (before de-duplication).
    expressions: every expression's statistics, gathered from all ranks (what ``metrics`` is computed from)."""

    metrics: Dict[str, float]
    convention: MetricConvention
    resolution: str
    seconds: float
    local_expressions: int
    expressions: ExpressionTable

    @property
    def expressions_per_s(self) -> float:
        return self.metrics["num_expressions"] / max(self.seconds, 1e-9)


Callback = Callable[[ScoredExpression], None]


def eval_step(model: torch.nn.Module, batch: Batch, amp_dtype: Optional[torch.dtype] = None):
    """The evaluation forward of one batch already on the model's device -> ``RSAMOutput`` (call under no_grad)."""
    device = batch.images.device
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        return model(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    convention: Union[str, MetricConvention] = DEFAULT_CONVENTION,
    resolution: str = "network",
    device: Union[None, str, torch.device] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    desc: str = "eval",
    group=None,
) -> EvalResult:
    """Run ``model`` over ``loader`` and compute the metrics (a collective when distributed).

    Args:
        model: an RSAM; put in eval mode here.
        loader: yields :class:`Batch`, ``(Batch, EvalExtras)`` (from :class:`EvalCollator`) or None.
        convention: ``official`` / ``standard`` or a :class:`MetricConvention` (foreground rule and Pr@X rule).
        resolution: ``network`` or ``original`` (needs extras with original-size masks).
        device: where to run (default: the model's device).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None for full precision.
        progress: show a progress bar with expressions/s (rank 0 only).
        callbacks: called with every :class:`ScoredExpression` of this rank.
        group: process group for the metric gather (default: the world, when initialised).
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    convention = MetricConvention.get(convention)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    collector = ExpressionCollector()
    world = distributed.world_size(group)
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(total=total, desc=desc, disable=not progress or distributed.rank(group) != 0, dynamic_ncols=True,
               leave=False, file=sys.stdout, mininterval=1.0, unit="batch")
    local = 0
    start = time.perf_counter()
    for item in loader:
        batch, extras = item if isinstance(item, tuple) else (item, None)
        if batch is None:  # every image of the batch was skipped as bad input
            bar.update(1)
            continue
        batch = batch.to(device, non_blocking=True)
        out = eval_step(model, batch, amp_dtype)
        if resolution == "network":
            scored = [(list(range(batch.num_expressions)), out.logits, batch.masks)]
        else:
            if extras is None or extras.masks is None:
                raise ValueError("resolution='original' needs the loader to carry original-size masks: wrap the "
                                 "dataset in EvalDataset(dataset, original_masks=True) and the collate in "
                                 "EvalCollator")
            scored = _original_resolution(batch, out.low_res_logits, extras.masks, device)
        active = [cb for cb in callbacks if not getattr(cb, "done", False)]
        for rows, logits, gt in scored:
            idx = torch.tensor(rows, device=device)
            stats = expression_stats(logits, gt, convention)
            collector.add(stats, [batch.sample_ids[i] for i in rows], [batch.categories[i] for i in rows],
                          batch.is_negative.index_select(0, idx))
            if active:
                _run_callbacks(active, rows, logits, gt, stats, batch, out, extras, convention)
        local += batch.num_expressions
        bar.update(1)
        bar.set_postfix_str(f"{local * world / max(time.perf_counter() - start, 1e-9):.1f} expr/s")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not distributed.any_rank(local > 0, group, device if device.type == "cuda" else None):
        raise ValueError(f"{desc}: no expression was evaluated (the split has no usable image, or every image "
                         "was skipped as bad input)")
    expressions = collector.gather(group)
    metrics = expressions.metrics(convention)
    return EvalResult(metrics, convention, resolution, time.perf_counter() - start, local, expressions)


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


def _run_callbacks(callbacks: Sequence[Callback], rows, logits, gt, stats: Dict[str, torch.Tensor], batch: Batch,
                   out, extras: Optional[EvalExtras], convention: MetricConvention) -> None:
    """``stats``: the rows' :func:`expression_stats`, as the metrics counted them."""
    stats = {k: v.tolist() for k, v in stats.items()}
    pred = convention.foreground(logits[:, 0] if logits.dim() == 4 else logits).cpu()
    gt = gt.cpu()
    images = batch.images.cpu()
    owner = batch.expr_to_image.tolist()
    iou = out.iou_pred[:, 0].float().cpu().tolist()
    score = out.object_score_logits[:, 0].float().cpu().tolist()
    negative = batch.is_negative.tolist()
    for j, i in enumerate(rows):
        expr = ScoredExpression(
            sample_id=tuple(batch.sample_ids[i]), text=extras.texts[i] if extras is not None else None,
            category=batch.categories[i], is_negative=bool(negative[i]), image=images[owner[i]], pred=pred[j],
            gt=gt[j], iou_pred=iou[i], object_score=score[i], tp=stats["tp"][j], fp=stats["fp"][j],
            fn=stats["fn"][j])
        for cb in callbacks:
            if not getattr(cb, "done", False):
                cb(expr)


class Evaluator:
    """One split, evaluated as often as needed with one loader (built here, once; workers persist).

    Args:
        dataset: a dataset of :class:`rsam.data.batch.ImageSample` (e.g. ``ReferringDataset`` in eval mode).
        collate: the ``Collator`` that turns samples into a :class:`Batch`.
        batch_size, num_workers: of the loader; this rank's shard of the images (no padding).
        convention, resolution, amp_dtype, progress: see :func:`evaluate`.
        name: the split's name (progress bar, error messages).
        rank, world_size: default the process group's.
    """

    def __init__(self, dataset, collate, batch_size: int = 1, num_workers: int = 0,
                 convention: Union[str, MetricConvention] = DEFAULT_CONVENTION, resolution: str = "network",
                 amp_dtype: Optional[torch.dtype] = None, progress: bool = True, name: str = "eval",
                 rank: Optional[int] = None, world_size: Optional[int] = None, persistent_workers: bool = True):
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        self.dataset = dataset
        self.convention = MetricConvention.get(convention)
        self.resolution = resolution
        self.amp_dtype = amp_dtype
        self.progress = progress
        self.name = name
        self.loader = build_eval_loader(
            EvalDataset(dataset, original_masks=resolution == "original"), EvalCollator(collate),
            batch_size=int(batch_size), num_workers=int(num_workers), rank=rank, world_size=world_size,
            persistent_workers=persistent_workers)

    def run(self, model: torch.nn.Module, callbacks: Sequence[Callback] = (),
            device: Union[None, str, torch.device] = None) -> EvalResult:
        """Metrics of ``model`` on the split (a collective when distributed; identical on every rank)."""
        return evaluate(model, self.loader, self.convention, self.resolution, device=device,
                        amp_dtype=self.amp_dtype, progress=self.progress, callbacks=callbacks, desc=self.name)
