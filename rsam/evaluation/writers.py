"""Evaluation callbacks: PNG masks + ``predictions.json``, error pictures, and TensorBoard panels."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from rsam import distributed
from rsam.evaluation.engine import ScoredExpression

__all__ = ["PREDICTIONS_JSON", "mask_file_name", "PredictionWriter", "VisualWriter", "PanelCollector"]

PREDICTIONS_JSON = "predictions.json"


def mask_file_name(sample_id: Tuple[str, int]) -> str:
    """``<image>_ann<k>.png`` for annotation k, ``<image>_neg<j>.png`` for the j-th drawn no-target expression."""
    name, aid = sample_id
    return f"{name}_ann{aid}.png" if aid >= 0 else f"{name}_neg{-1 - aid}.png"


class PredictionWriter:
    """Callback writing one PNG mask per expression (0/255, at the scoring resolution) and, on :meth:`close`,
    ``predictions.json`` with every expression's scores (gathered from all ranks; written by rank 0).

    The masks hold the binary prediction of the evaluation's convention, so
    :func:`rsam.evaluation.rescore.rescore` reproduces the metrics exactly without a model.
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
        parts = distributed.all_gather_object(self.records)
        if distributed.rank() != 0:
            return None
        records = sorted((r for p in parts for r in p), key=lambda r: (r["image"], r["annotation_id"]))
        path = os.path.join(self.out_dir, PREDICTIONS_JSON)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**self.meta, "metrics": metrics, "predictions": records}, f, indent=1)
        return path


class VisualWriter:
    """Callback writing the first ``k`` expressions it sees as a TP/FP/FN error picture (over a grey copy of the
    image) and an overlay of the prediction and ground-truth outlines, each beside the colour input.

    ``image_loader(name) -> uint8 (H, W, 3)`` gives the original image; it is resized to the scoring resolution
    (the network input's size, or kept at the original size).
    """

    def __init__(self, out_dir: str, k: int, image_loader: Callable[[str], np.ndarray]):
        self.out_dir, self.k, self.image_loader = out_dir, int(k), image_loader
        self.written = 0
        os.makedirs(out_dir, exist_ok=True)

    @property
    def done(self) -> bool:
        return self.written >= self.k

    def __call__(self, e: ScoredExpression) -> None:
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
        # the colour input beside each picture; errors over a grey copy, masks as outlines (visualization.py)
        draw_errors(image, e.pred.numpy(), e.gt.numpy(), text=f'"{text}"', detail=detail, side_by_side=True).save(
            os.path.join(self.out_dir, f"{stem}_errors.png"))
        draw_masks(image, [e.pred.numpy(), e.gt.numpy()],
                   [Caption(f'prediction: "{text}"', (255, 48, 48), detail),
                    Caption("ground truth", (40, 220, 60))],
                   title=f"{e.sample_id[0]} ({e.category})", style="outline", side_by_side=True).save(
                       os.path.join(self.out_dir, f"{stem}_overlay.png"))
        self.written += 1


class PanelCollector:
    """Keeps the first ``k`` expressions as captioned (image | ground truth | prediction) panels for TensorBoard.

    ``panels``: list of ``(caption, (3, H, W) float tensor in [0, 1])``. The picture carries its own caption
    underneath (file name, expression, IoU, which panel is which), so it reads without the text tab; ``caption``
    is the same as one line of Markdown for the text tab.
    """

    def __init__(self, k: int):
        self.k = int(k)
        self.panels: List[Tuple[str, torch.Tensor]] = []

    @property
    def done(self) -> bool:
        return len(self.panels) >= self.k

    def __call__(self, e: ScoredExpression) -> None:
        from rsam.visualization import Caption, _with_captions, comparison_panel

        name, aid = e.sample_id
        text = f'"{e.text}"' if e.text is not None else "(no expression text)"
        title = f"{name} ({'no-target expression' if e.is_negative else f'annotation {aid}'}, {e.category})"
        scores = f"IoU {e.iou:.3f} | predicted IoU {e.iou_pred:.3f} | object score {e.object_score:+.2f}"
        panel = comparison_panel(e.image, e.gt, e.pred)
        picture = (panel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        captioned = _with_captions(picture, [Caption(text, None, scores),
                                             Caption("middle: ground truth", (0, 255, 0)),
                                             Caption("right: prediction", (255, 0, 0))], title=title)
        image = torch.from_numpy(np.asarray(captioned).copy()).permute(2, 0, 1).float() / 255.0
        self.panels.append((f"**{title}**: {text} | {scores}", image))
