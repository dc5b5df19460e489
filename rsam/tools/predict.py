"""Segment what referring expressions describe in images; write masks, overlays and predictions.jsonl.

    rsam-predict --checkpoint best.pt --image scene.jpg --text "the red ship" --text "the largest building" --out out/
    rsam-predict --checkpoint user/rsam-b-plus --image scenes/ "tiles/*.tif" --texts-file texts.csv --out out/
    rsam-predict --checkpoint export_dir/ --image s2.tif --bands 4,3,2 --text "the lake" --batch-size 8 --out out/
    python -m rsam.tools.predict --checkpoint official.pt --config configs/rsam_b+_b_official.yaml ...

--checkpoint: a training checkpoint, an official RSAM checkpoint with --config, a pretrained directory
(rsam-export) or a Hugging Face Hub repo id ("user/name", --revision; cached in the standard HF cache).
--image: files, folders (their images, sorted) and globs ("tiles/**/*.tif"). Expressions: --text (repeat it;
the same set for every image) or --texts-file, JSON {image: [expressions]} or CSV with the columns
image,expression; keys match an image by path (absolute, or relative to the texts file's folder or to the
current directory), else by file name when only one key has it. Images of --image that the texts file does not
name are skipped (one summary line); without --image the texts file's keys are the images. Rasters deeper than 8 bits or with other than
3 bands: --bands and a per-band 2-98 % percentile stretch (--stretch), see rsam/tools/predict_inputs.py.
--batch-size N runs the image encoder on N images at a time.

--out gets, per image, ``<image>_<k>_<expression>.png`` (mask k at the image's size, 0 / 255), a GeoTIFF of it
(``.tif``, same CRS and transform) for georeferenced inputs when rasterio is installed, ``<image>_overlay.png``
(the input beside the masks drawn as outlines, --overlay-style / --no-side-by-side), ``<image>_predictions.json``;
and one ``predictions.jsonl``: a line per expression with the image, the expression, the mask as a COCO RLE at
the original size (pycocotools.mask.decode reads it), iou_pred, object_score, no_target and the mask file.

Exit status: 0 when every image was written; 1 when some image failed (each failure is named on stderr, the
others are still written); 2 for a usage error (a one-line message: bad flag, device, checkpoint, config).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from rsam.atomic_files import atomic_path
from rsam.cli import run_command
from rsam.errors import UserError
from rsam.tools.output_names import JSONL, PNG_LEVEL, slug

__all__ = ["main", "predict_cli", "write_outputs", "PredictRun"]

LOG = logging.getLogger("rsam.predict")


def write_outputs(predictor, predictions, image_path: str, out_dir: str, image=None, stem: Optional[str] = None,
                  style: str = "outline", side_by_side: bool = True, georef: Optional[dict] = None,
                  note: str = "") -> dict:
    """Write the mask PNGs (and GeoTIFFs with ``georef``), the overlay and ``<stem>_predictions.json`` of one
    image -> its record (``predictions``: one dict per expression, with its COCO ``rle``).

    ``image``: uint8 (H, W, 3), default the predictor's current image; ``stem``: file name prefix (default
    the image's file name without extension).
    """
    from rsam.data.rle import encode_rle
    from rsam.visualization import Caption, draw_masks, mask_to_png

    os.makedirs(out_dir, exist_ok=True)
    image = predictor.image if image is None else image
    stem = stem or os.path.splitext(os.path.basename(image_path))[0]
    h, w = image.shape[:2]
    captions, masks, records = [], [], []
    for k, p in enumerate(predictions):
        mask = p.mask.numpy()
        mask_file = f"{stem}_{k}_{slug(p.text)}.png"
        mask_to_png(mask).save(os.path.join(out_dir, mask_file), compress_level=PNG_LEVEL)
        area = int(mask.sum())
        if p.no_target:
            detail = f"NO TARGET: object score {p.object_score:+.2f} <= 0, mask empty"
        else:
            detail = f"predicted IoU {p.iou_pred:.2f} | object score {p.object_score:+.2f} | {area} px"
        captions.append(Caption(f'"{p.text}"' + ("  (no target)" if p.no_target else ""), None, detail))
        masks.append(mask)
        record = {"expression": p.text, "mask": mask_file, "no_target": bool(p.no_target),
                  "iou_pred": float(p.iou_pred), "object_score": float(p.object_score), "area_px": area,
                  "rle": encode_rle(mask)}
        if georef is not None:
            from rsam.tools.predict_inputs import write_geotiff_mask

            record["mask_geotiff"] = mask_file[:-4] + ".tif"
            write_geotiff_mask(os.path.join(out_dir, record["mask_geotiff"]), mask, georef)
        records.append(record)
    overlay_file = f"{stem}_overlay.png"
    title = f"{os.path.basename(image_path)} ({w}x{h})" + (f", {note}" if note else "")
    draw_masks(image, masks, captions, title=title, style=style, side_by_side=side_by_side).save(
        os.path.join(out_dir, overlay_file), compress_level=PNG_LEVEL)
    record = {"image": os.path.abspath(image_path), "height": h, "width": w, "overlay": overlay_file,
              "predictions": records}
    with open(os.path.join(out_dir, f"{stem}_predictions.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return record


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsam-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint, official checkpoint (+ --config), pretrained directory or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id")
    p.add_argument("--image", nargs="+", default=None,
                   help="image files, folders and globs (default with --texts-file: the images it names)")
    p.add_argument("--text", action="append", default=None, help="referring expression (repeat for several)")
    p.add_argument("--texts-file", default=None, help="JSON {image: [expressions]} or CSV image,expression")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None, help="YAML config (default: the one stored with the checkpoint)")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (default: tokenizer.vocab of the config)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=1, help="images per image-encoder call (default 1)")
    p.add_argument("--bands", default=None, help="bands to use, 1-based: 3,2,1 (R,G,B) or one band (grey)")
    p.add_argument("--stretch", default="2,98", help="percentiles of the per-band stretch of non-8-bit rasters")
    p.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold (default 0)")
    p.add_argument("--fill-holes", type=int, default=0, metavar="A", help="fill holes of at most A pixels")
    p.add_argument("--remove-islands", type=int, default=0, metavar="A",
                   help="remove foreground islands smaller than A pixels")
    p.add_argument("--overlay-style", choices=("outline", "fill"), default="outline",
                   help="masks as outlines (default: the object keeps its own colour) or tinted fills")
    p.add_argument("--side-by-side", action=argparse.BooleanOptionalAction, default=True,
                   help="the input image beside the overlay (default on)")
    p.add_argument("--scene", action=argparse.BooleanOptionalAction, default=None,
                   help="scene mode (rsam/scene/): tiles at native resolution, GeoTIFF + GeoJSON masks; default: "
                        "on for images over 25 megapixels")
    p.add_argument("--scene-mode", choices=("overview", "tiles"), default="overview",
                   help="overview (default): a coarse pass on the whole scene picks the tiles to refine; tiles: "
                        "every tile (category-like expressions: \"all storage tanks\")")
    p.add_argument("--merge", choices=("max", "blend"), default="max",
                   help="scene mode: overlapping tiles keep the largest logit (default) or a weighted mean")
    p.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                   help="scene mode: overlap of neighbouring tiles (default: 1/8 of the network input)")
    p.add_argument("--scene-margin", type=int, default=None, metavar="PX",
                   help="overview mode: pixels refined around the coarse mask (default: the tile overlap)")
    p.add_argument("--vector-crs", choices=("wgs84", "native"), default="wgs84",
                   help="scene mode: GeoJSON in longitude/latitude (RFC 7946, default) or the scene's own CRS")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off when stderr is no TTY)")
    p.add_argument("--quiet", action="store_true", help="no per-image lines on stdout")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of --config, e.g. model.image_size=512")
    return p.parse_args(argv)


@dataclass
class PredictRun:
    """What a run did: exit ``status``, one record per written image, ``(image, message)`` per failure."""

    status: int
    records: List[dict] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)


def _unique_stems(paths: Sequence[str]) -> List[str]:
    """Output file prefixes: the file name without extension, ``-2``, ``-3`` ... where two images share it."""
    seen: Dict[str, int] = {}
    stems = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        stems.append(stem if n == 1 else f"{stem}-{n}")
    return stems


def _load_predictor(args: argparse.Namespace):
    from rsam.predictor import RSAMPredictor
    from rsam.tools.predict_inputs import parse_device

    device = None if args.device is None else parse_device(args.device)
    return RSAMPredictor.load(args.checkpoint, config=args.config, device=device, revision=args.revision,
                              vocab=args.vocab, overrides=args.overrides, mask_threshold=args.threshold)


def _check_args(args: argparse.Namespace):
    from rsam.tools.predict_inputs import TextTable, parse_bands, parse_stretch, read_texts_file

    if args.fill_holes < 0 or args.remove_islands < 0:
        raise UserError("--fill-holes and --remove-islands must be >= 0")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.overrides and args.config is None:
        raise UserError("overrides need --config")
    if (args.text is None) == (args.texts_file is None):
        raise UserError("give the expressions with --text (repeatable) or with --texts-file, not both or neither")
    if args.text is not None and any(not t.strip() for t in args.text):
        raise UserError("--text: empty expression")
    if args.image is None and args.texts_file is None:
        raise UserError("--image is required with --text (with --texts-file it defaults to the images it names)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder (it is created when missing)")
    table = None
    if args.texts_file is not None:
        table = TextTable(read_texts_file(args.texts_file), os.path.dirname(os.path.abspath(args.texts_file)))
    return parse_bands(args.bands), parse_stretch(args.stretch), table


def predict_cli(argv: Optional[Sequence[str]] = None) -> PredictRun:
    """Everything ``main`` does -> :class:`PredictRun`. Usage errors raise (argparse: ``SystemExit(2)``; the rest:
    :class:`rsam.errors.UserError`, which ``main`` prints as one line with exit status 2)."""
    from rsam.scene.cli import predict_scenes, split_scene_inputs

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    bands, stretch, table = _check_args(args)
    paths = _images(args, table)
    paths, scenes = split_scene_inputs(paths, args, bands, stretch, table)
    predictor = _load_predictor(args)
    os.makedirs(args.out, exist_ok=True)
    run = PredictRun(status=0)
    _predict_all(predictor, args, paths, bands, stretch, table, run)
    predict_scenes(predictor, args, scenes, bands, stretch, table, run)
    if table is not None and table.unused():
        unused = table.unused()
        print(f"rsam-predict: warning: {len(unused)} key(s) of {args.texts_file} matched no image: "
              + ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""), file=sys.stderr)
    if run.failures:
        print(f"rsam-predict: {len(run.failures)} of {len(paths) + len(scenes)} image(s) failed; the other {len(run.records)} "
              f"are in {args.out}", file=sys.stderr)
        run.status = 1
    return run


def _images(args: argparse.Namespace, table) -> List[str]:
    """The images to run: ``--image`` (with a texts file: those it names), else the texts file's own."""
    from rsam.tools.predict_inputs import collect_inputs

    if args.image is None:
        return table.images()
    paths = collect_inputs(args.image)
    if table is None:
        return paths
    named = [p for p in paths if table.lookup(p) is not None]
    if not named:
        raise UserError(f"none of the {len(paths)} image(s) of --image is named in {args.texts_file}")
    if len(named) < len(paths):
        print(f"rsam-predict: {len(paths) - len(named)} of {len(paths)} image(s) are not named in "
              f"{args.texts_file} and are skipped")
    return named


def _predict_all(predictor, args, paths, bands, stretch, table, run: PredictRun) -> None:
    """Read, predict and write every image, ``args.batch_size`` at a time; failures go to ``run.failures``."""
    from tqdm import tqdm

    from rsam.data.images import ImageInputError
    from rsam.tools.predict_inputs import read_image

    stems = _unique_stems(paths)
    show = not args.no_progress and sys.stderr.isatty()
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not show, dynamic_ncols=True)

    def fail(path: str, message: str) -> None:
        run.failures.append((path, message))
        bar.write(f"rsam-predict: {message}", file=sys.stderr)
        bar.update(1)

    # written beside, renamed over the previous run's file when complete: a failed run leaves that one intact
    with atomic_path(os.path.join(args.out, JSONL)) as tmp, open(tmp, "w", encoding="utf-8") as jsonl:
        for start in range(0, len(paths), args.batch_size):
            ready = []  # (index, loaded image, expressions)
            for i in range(start, min(start + args.batch_size, len(paths))):
                texts = args.text if table is None else table.lookup(paths[i])
                if texts is None:
                    fail(paths[i], f"{paths[i]}: no expressions for this image in {args.texts_file}")
                    continue
                try:
                    loaded = read_image(paths[i], bands, stretch)
                    predictor.check_texts(texts)
                except (ImageInputError, FileNotFoundError, ValueError, TypeError, OSError) as exc:
                    fail(paths[i], str(exc) if paths[i] in str(exc) else f"{paths[i]}: {exc}")
                    continue
                ready.append((i, loaded, texts))
            if not ready:
                continue
            results = predictor.predict_batch([r[1].rgb for r in ready], [r[2] for r in ready],
                                              fill_hole_area=args.fill_holes, min_island_area=args.remove_islands)
            for (i, loaded, _), predictions in zip(ready, results):
                try:
                    record = write_outputs(predictor, predictions, paths[i], args.out, image=loaded.rgb,
                                           stem=stems[i], style=args.overlay_style, side_by_side=args.side_by_side,
                                           georef=loaded.georef, note=loaded.note)
                except OSError as exc:
                    fail(paths[i], f"{paths[i]}: cannot write its outputs to {args.out} ({exc})")
                    continue
                _append_jsonl(jsonl, paths[i], record)
                run.records.append(record)
                if loaded.note and args.bands is None:  # a conversion the user did not choose: say it
                    bar.write(f"{paths[i]}: {loaded.note}", file=sys.stdout)
                if not args.quiet:
                    _print_record(bar, paths[i], record, args.out)
                bar.update(1)
    bar.close()


def _append_jsonl(f, path: str, record: dict) -> None:
    for k, r in enumerate(record["predictions"]):
        line = {"image": path, "index": k, "expression": r["expression"], "height": record["height"],
                "width": record["width"], "rle": r["rle"], "iou_pred": r["iou_pred"],
                "object_score": r["object_score"], "no_target": r["no_target"], "area_px": r["area_px"],
                "mask": r["mask"], "overlay": record["overlay"]}
        if "mask_geotiff" in r:
            line["mask_geotiff"] = r["mask_geotiff"]
        f.write(json.dumps(line) + "\n")
    f.flush()


def _print_record(bar, path: str, record: dict, out: str) -> None:
    lines = [f"{path} ({record['width']}x{record['height']}):"]
    for r in record["predictions"]:
        what = "no target" if r["no_target"] else f"{r['area_px']} px, predicted IoU {r['iou_pred']:.2f}"
        lines.append(f"  \"{r['expression']}\": {what} (object score {r['object_score']:+.2f}) -> {r['mask']}")
    lines.append(f"  overlay: {os.path.join(out, record['overlay'])}")
    bar.write("\n".join(lines), file=sys.stdout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``rsam-predict``): 0 success, 1 some image failed, 2 usage error."""
    return run_command("rsam-predict", lambda: predict_cli(argv).status)


if __name__ == "__main__":
    sys.exit(main())
