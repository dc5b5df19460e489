"""Scene mode inside ``rsam-predict``: which inputs are scenes, the checks made before the model loads, and the
files written per scene (rsam/tools/predict.py dispatches here).

Per scene ``<stem>`` and expression ``<i>`` in ``--out``:

* ``<stem>_<i>_<slug>.tif``: the mask, uint8 0 / 255, the scene's size, CRS and transform, a Cloud-Optimized
  GeoTIFF (rsam/scene/writer.py);
* ``<stem>_<i>_<slug>.geojson``: its polygons (rsam/scene/vectors.py; ``--vector-crs``);
* ``<stem>_overview.png``: the scene shrunk to 1024 px with every mask drawn on it;
* a line in ``predictions.jsonl`` with the scene's ``height`` / ``width``, the scores, ``area_px``, the files,
  ``scene`` (mode, merge, tile size, overlap, tiles run / in the grid) and ``rle`` (a COCO RLE of the mask
  below ``RLE_MAX_PIXELS``, else null: read the GeoTIFF).
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

from rsam.errors import UserError
from rsam.scene.limits import AUTO_SCENE_PIXELS, RLE_MAX_PIXELS, check_scene_limits
from rsam.scene.reader import SceneReader
from rsam.scene.run import OVERVIEW_SIDE, SceneOptions, SceneResult, segment_scene

__all__ = ["split_scene_inputs", "predict_scenes"]


def _have_rasterio() -> bool:
    from rsam.tools.predict_inputs import have_rasterio

    return have_rasterio()


def _pixels(path: str) -> int:
    """Height x width from the file's header (0 when rasterio cannot open it: the plain path reports it)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return int(src.height) * int(src.width)
    except RasterioError:
        return 0


def _texts_of(path: str, args, table) -> Optional[List[str]]:
    return args.text if table is None else table.lookup(path)


def split_scene_inputs(paths: Sequence[str], args, bands, stretch, table) -> Tuple[List[str], List[str]]:
    """(plain images, scenes) of ``paths``: all scenes with ``--scene``, none with ``--no-scene``, otherwise
    those over ``AUTO_SCENE_PIXELS``. Every scene is opened and checked now (readable, bands, size and disk
    limits), before the model loads; a problem is a :class:`UserError` naming the file."""
    if args.scene is False:
        return list(paths), []
    if args.scene is None:
        if not _have_rasterio():
            return list(paths), []
        scenes = [p for p in paths if _pixels(p) > AUTO_SCENE_PIXELS]
    else:
        if not _have_rasterio():
            raise UserError("--scene needs rasterio: pip install \"rsam[geo]\"")
        scenes = list(paths)
    if not scenes:
        return list(paths), []
    if args.fill_holes or args.remove_islands:
        raise UserError(f"{scenes[0]}: --fill-holes / --remove-islands are not available in scene mode")
    for flag, value in (("--tile-overlap", args.tile_overlap), ("--scene-margin", args.scene_margin)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    checked = []
    for path in scenes:
        try:
            with SceneReader(path, bands, stretch) as reader:
                reader.check_readable()
                texts = _texts_of(path, args, table)
                check_scene_limits(path, reader.height, reader.width, len(texts or ()), args.out)
        except UserError:
            if args.scene:  # asked for: the problem is the command's
                raise
            continue  # picked by size only: it stays a plain image, whose reading reports it with the others
        checked.append(path)
    return [p for p in paths if p not in set(checked)], checked


def _unique(stem: str, taken: set) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def predict_scenes(predictor, args, scenes: Sequence[str], bands, stretch, table, run) -> None:
    """Segment every scene and write its files; lines are appended to ``predictions.jsonl``; a scene that fails
    while running is added to ``run.failures`` (the others are still written)."""
    from rasterio.errors import RasterioError

    from rsam.tools.output_names import JSONL

    taken: set = set()
    options = SceneOptions(mode=args.scene_mode, merge=args.merge, overlap=args.tile_overlap,
                           margin=args.scene_margin, batch_size=args.batch_size,
                           progress=not args.no_progress and sys.stderr.isatty())
    for path in scenes:
        texts = _texts_of(path, args, table)
        if texts is None:
            message = f"{path}: no expressions for this image in {args.texts_file}"
            run.failures.append((path, message))
            print(f"rsam-predict: {message}", file=sys.stderr)
            continue
        stem = _unique(os.path.splitext(os.path.basename(path))[0] or "image", taken)
        try:
            predictor.check_texts(texts)
            record = _predict_scene(predictor, path, stem, texts, args, bands, stretch, options)
        except (UserError, RasterioError, OSError, ValueError) as exc:
            message = str(exc) if path in str(exc) else f"{path}: {exc}"
            run.failures.append((path, message))
            print(f"rsam-predict: {message}", file=sys.stderr)
            continue
        with open(os.path.join(args.out, JSONL), "a", encoding="utf-8") as f:
            for line in record["lines"]:
                f.write(json.dumps(line) + "\n")
        run.records.append(record)
        if not args.quiet:
            _print_record(path, record)


def _predict_scene(predictor, path: str, stem: str, texts: Sequence[str], args, bands, stretch,
                   options: SceneOptions) -> dict:
    """One scene: masks, polygons, picture -> its record (``lines``: one predictions.jsonl line each)."""
    from rsam.atomic_files import write_text_atomically
    from rsam.tools.output_names import slug
    from rsam.scene.tiling import tile_grid
    from rsam.scene.vectors import geojson_text, mask_polygons

    names = [f"{stem}_{i}_{slug(t)}" for i, t in enumerate(texts)]
    with SceneReader(path, bands, stretch) as reader:
        masks = [os.path.join(args.out, n + ".tif") for n in names]
        results, overview = segment_scene(predictor, reader, texts, masks, options)
        if overview is None:
            overview = reader.overview(max(OVERVIEW_SIDE, int(predictor.model.image_size)))
        crs = reader.crs if reader.georeferenced else None
        height, width = reader.height, reader.width
    vector_crs = "pixel" if crs is None else args.vector_crs
    for name, result in zip(names, results):
        polygons = list(mask_polygons(result.mask_path, args.vector_crs))
        write_text_atomically(os.path.join(args.out, name + ".geojson"),
                              geojson_text(polygons, result.text, crs, args.vector_crs))
    picture = f"{stem}_overview.png"
    _draw(overview, results, os.path.join(args.out, picture), path, width, height, args)
    size = int(predictor.model.image_size)
    overlap = size // 8 if options.overlap is None else options.overlap
    grid = tile_grid(height, width, size, overlap)
    scene = {"mode": options.mode, "merge": options.merge, "tile": [grid[0][0].height, grid[0][0].width],
             "overlap": overlap, "tiles_total": sum(len(row) for row in grid)}
    lines = []
    for k, (name, r) in enumerate(zip(names, results)):
        lines.append({"image": path, "index": k, "expression": r.text, "height": height, "width": width,
                      "rle": _rle(r.mask_path, height, width), "iou_pred": r.iou_pred,
                      "object_score": r.object_score, "no_target": r.no_target, "area_px": r.area_px,
                      "mask": name + ".tif", "mask_geotiff": name + ".tif", "geojson": name + ".geojson",
                      "vector_crs": vector_crs, "crs": None if crs is None else crs.to_string(),
                      "overlay": picture, "scene": {**scene, "tiles_run": r.tiles_run}})
    return {"image": os.path.abspath(path), "height": height, "width": width, "overlay": picture, "lines": lines}


def _rle(mask_path: str, height: int, width: int) -> Optional[dict]:
    """The COCO RLE of a written mask below ``RLE_MAX_PIXELS``, else None."""
    if height * width > RLE_MAX_PIXELS:
        return None
    from rsam.data.rle import encode_rle
    from rsam.scene.writer import read_mask

    return encode_rle(read_mask(mask_path))


def _draw(overview, results: Sequence[SceneResult], out: str, path: str, width: int, height: int, args) -> None:
    """The overview with each expression's mask outlined (shrunk from the written mask) -> a PNG at ``out``."""
    from rsam.atomic_files import atomic_path
    from rsam.scene.writer import read_mask
    from rsam.tools.output_names import PNG_LEVEL
    from rsam.visualization import Caption, draw_masks

    masks, captions = [], []
    for r in results:
        masks.append(read_mask(r.mask_path, overview.shape[:2]))
        detail = ("NO TARGET" if r.no_target else f"{r.area_px} px") + f" | object score {r.object_score:+.2f}" \
            + f" | {r.tiles_run} tile(s)"
        captions.append(Caption(f'"{r.text}"', None, detail))
    title = f"{os.path.basename(path)} ({width}x{height}, scene mode: {args.scene_mode})"
    picture = draw_masks(overview, masks, captions, title=title, style=args.overlay_style,
                         side_by_side=args.side_by_side)
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG", compress_level=PNG_LEVEL)


def _print_record(path: str, record: dict) -> None:
    print(f"{path} ({record['width']}x{record['height']}, scene):")
    for line in record["lines"]:
        what = "no target" if line["no_target"] else f"{line['area_px']} px"
        print(f"  \"{line['expression']}\": {what} (object score {line['object_score']:+.2f}, "
              f"{line['scene']['tiles_run']} tiles) -> {line['mask']}, {line['geojson']}")
    print(f"  overview: {record['overlay']}")
