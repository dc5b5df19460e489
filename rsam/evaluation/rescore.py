"""Re-scoring written predictions (``--save-predictions``) against a dataset, without a model."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Union

import numpy as np
import torch
from PIL import Image

from rsam.evaluation.inputs import original_gt_masks
from rsam.evaluation.metrics import DEFAULT_CONVENTION, MetricAccumulator, MetricConvention
from rsam.evaluation.writers import PREDICTIONS_JSON

__all__ = ["rescore"]

log = logging.getLogger(__name__)


def rescore(pred_dir: str, dataset, convention: Union[None, str, MetricConvention] = None) -> Dict[str, float]:
    """Recompute the metrics of ``<pred_dir>/predictions.json`` and its PNG masks against ``dataset``'s GT.

    Args:
        pred_dir: a ``--save-predictions`` folder.
        dataset: the evaluated split (a :class:`rsam.data.dataset.ReferringDataset` with the same settings).
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
    recorded = data.get("convention", DEFAULT_CONVENTION)
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
