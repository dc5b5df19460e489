"""Segment what referring expressions describe in an image, and write masks plus an overlay to look at.

    rsam-predict --checkpoint best.pt --image scene.jpg --text "the red ship" --text "the largest building" --out out/
    python -m rsam.tools.predict --checkpoint official.pt --config configs/rsam_b+_b_official.yaml ...

For each image, ``--out`` gets

* ``<image>_<k>_<expression>.png``: the mask of expression k at the image's size (0 / 255, 8-bit grey);
* ``<image>_overlay.png``: every mask tinted over the image in its own colour, with the expressions as
  captions and, for each, the predicted IoU and object score -- or "no target" where the object score says
  the expression refers to nothing in the image (its mask is empty);
* ``<image>_predictions.json``: the same numbers, machine-readable.

Exit status: 0 on success, 2 for bad input (a one-line message names the file or setting).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "predict_cli", "write_outputs"]


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "expression"


def write_outputs(predictor, predictions, image_path: str, out_dir: str) -> dict:
    """Write the mask PNGs, the overlay and the JSON for one image; returns the JSON record."""
    from rsam.visualization import Caption, draw_masks, mask_to_png

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(image_path))[0]
    h, w = predictor.original_size
    captions, masks, records = [], [], []
    for k, p in enumerate(predictions):
        mask_file = f"{stem}_{k}_{_slug(p.text)}.png"
        mask_to_png(p.mask.numpy()).save(os.path.join(out_dir, mask_file))
        area = int(p.mask.sum())
        if p.no_target:
            detail = f"NO TARGET: object score {p.object_score:+.2f} <= 0, mask empty"
        else:
            detail = f"predicted IoU {p.iou_pred:.2f} | object score {p.object_score:+.2f} | {area} px"
        captions.append(Caption(f'"{p.text}"' + ("  (no target)" if p.no_target else ""), None, detail))
        masks.append(p.mask.numpy())
        records.append({"expression": p.text, "mask": mask_file, "no_target": p.no_target,
                        "iou_pred": p.iou_pred, "object_score": p.object_score, "area_px": area})
    overlay_file = f"{stem}_overlay.png"
    draw_masks(predictor.image, masks, captions, title=f"{os.path.basename(image_path)} ({w}x{h})").save(
        os.path.join(out_dir, overlay_file))
    record = {"image": os.path.abspath(image_path), "height": h, "width": w, "overlay": overlay_file,
              "predictions": records}
    with open(os.path.join(out_dir, f"{stem}_predictions.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return record


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsam-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RSAM checkpoint (ours; official ones need --config)")
    p.add_argument("--image", required=True, nargs="+", help="image file(s): JPEG, PNG, 8-bit TIFF, ...")
    p.add_argument("--text", required=True, action="append", help="referring expression (repeat for several)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (default: tokenizer.vocab of the config)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold (default 0)")
    p.add_argument("--fill-holes", type=int, default=0, metavar="A", help="fill holes of at most A pixels")
    p.add_argument("--remove-islands", type=int, default=0, metavar="A",
                   help="remove foreground islands smaller than A pixels")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of --config, e.g. model.image_size=512")
    return p.parse_args(argv)


def predict_cli(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """Everything ``main`` does; returns one record per image (what ``<image>_predictions.json`` holds)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.fill_holes < 0 or args.remove_islands < 0:
        raise SystemExit("error: --fill-holes and --remove-islands must be >= 0")
    if args.overrides and args.config is None:
        raise SystemExit("error: overrides need --config")
    try:
        return _run(args)
    except Exception as exc:
        from rsam.checkpoint import CheckpointError

        expected = (ValueError, FileNotFoundError, KeyError, CheckpointError)  # bad input, not a bug
        if os.environ.get("RSAM_DEBUG") or not isinstance(exc, expected):
            raise
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {text}\n(set RSAM_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> List[dict]:
    from rsam.data.images import load_image
    from rsam.predictor import RSAMPredictor

    # Read every image first: a bad file is reported before the model is built.
    images = [(path, load_image(path)) for path in args.image]
    predictor = RSAMPredictor.from_checkpoint(args.checkpoint, config=args.config, device=args.device,
                                              vocab=args.vocab, overrides=args.overrides,
                                              mask_threshold=args.threshold)
    records = []
    for path, rgb in images:
        predictor.set_image(rgb)
        predictions = predictor.predict(args.text, fill_hole_area=args.fill_holes,
                                        min_island_area=args.remove_islands)
        record = write_outputs(predictor, predictions, path, args.out)
        records.append(record)
        print(f"{path} ({record['width']}x{record['height']}):")
        for r in record["predictions"]:
            what = "no target" if r["no_target"] else f"{r['area_px']} px, predicted IoU {r['iou_pred']:.2f}"
            print(f"  \"{r['expression']}\": {what} (object score {r['object_score']:+.2f}) -> {r['mask']}")
        print(f"  overlay: {os.path.join(args.out, record['overlay'])}")
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``rsam-predict``): exit status 0 on success."""
    predict_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
