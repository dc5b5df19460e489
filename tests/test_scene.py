"""Scene mode (rsam/scene/, rsam-predict --scene) on a tiny random checkpoint (64 px network, CPU), small scenes.

What is checked: a scene that fits one tile gives exactly the plain predictor's mask; the streamed tiled merge
(max and blend) equals an in-memory full-resolution reference; the written mask keeps the scene's size, CRS
and transform and is a Cloud-Optimized GeoTIFF; GeoJSON polygons (WGS 84 and native) rasterise back to the
mask; the whole command writes <stem>_<i>_<slug>.tif / .geojson and predictions.jsonl lines; plain PNG scenes
use pixel coordinates; a gated coarse pass runs no tile; non-raster / truncated files and a 100000 x 100000
scene are one-line errors with exit status 2 before any tile runs.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from pycocotools import mask as mask_utils
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.warp import transform_geom

from rsam.predictor import RSAMPredictor
from rsam.scene.coarse import coarse_pass
from rsam.scene.merge import StripMerger, ramp_weights
from rsam.scene.reader import SceneReader
from rsam.scene.run import SceneOptions, segment_scene
from rsam.scene.synthetic import CRS, write_synthetic_scene
from rsam.scene.tiling import starts, tile_grid
from rsam.scene.vectors import mask_polygons
from rsam.scene.writer import read_mask
from rsam.tools.predict import JSONL, main
from tiny_rsam_setup import make_checkpoint, tiny_checkpoint

TEXTS = ["the red ship", "the largest white building at the top left"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scene")
    vocab, config, ckpt = tiny_checkpoint(tmp)
    scene = tmp / "scene.tif"
    write_synthetic_scene(str(scene), 150, 170, objects=6, seed=1, object_size=48)
    predictor = RSAMPredictor.load(str(ckpt), device="cpu")
    return {"tmp": tmp, "config": config, "ckpt": ckpt, "scene": scene, "predictor": predictor}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def _segment(setup, path, out: Path, **options):
    out.mkdir(exist_ok=True)
    masks = [str(out / f"m{k}.tif") for k in range(len(TEXTS))]
    with SceneReader(str(path)) as reader:
        results, _ = segment_scene(setup["predictor"], reader, TEXTS, masks, SceneOptions(batch_size=1, **options))
    return results, [read_mask(m) for m in masks]


def _reference(setup, path, merge: str, overlap: int) -> np.ndarray:
    """Every tile on the image held whole in memory, merged into full-size canvases -> bool (n, H, W)."""
    predictor = setup["predictor"]
    with rasterio.open(path) as src:
        image = np.moveaxis(src.read(), 0, -1)
    h, w = image.shape[:2]
    value = np.full((len(TEXTS), h, w), -np.inf if merge == "max" else 0.0, np.float32)
    weight = np.zeros((len(TEXTS), h, w), np.float32)
    for row in tile_grid(h, w, 64, overlap):
        for t in row:
            crop = image[t.y0:t.y0 + t.height, t.x0:t.x0 + t.width]
            (predictions,) = predictor.predict_batch([crop], [TEXTS])
            for e, p in enumerate(predictions):
                if p.no_target:
                    continue
                region = (e, slice(t.y0, t.y0 + t.height), slice(t.x0, t.x0 + t.width))
                if merge == "max":
                    value[region] = np.maximum(value[region], p.logits.numpy())
                else:
                    ramp = ramp_weights(t.height, t.width, overlap)
                    value[region] += ramp * p.logits.numpy()
                    weight[region] += ramp
    if merge == "blend":
        value = np.where(weight > 0, value / np.maximum(weight, 1e-12), -np.inf)
    return value > predictor.mask_threshold


def test_tile_starts_cover_the_axis_with_the_overlap():
    assert starts(64, 64, 8) == [0] and starts(40, 64, 8) == [0]
    assert starts(150, 64, 16) == [0, 48, 86]
    for length, tile, overlap in [(1000, 64, 8), (65, 64, 0), (777, 100, 30)]:
        s = starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] == length - tile
        assert all(0 < b - a <= tile - overlap for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("merge", ["max", "blend"])
def test_strip_merger_equals_a_full_canvas(merge):
    """Random logits on a 3 x 4 tile grid: the streamed rows equal a whole-scene merge."""
    rng = np.random.default_rng(0)
    h, w, size, overlap = 90, 120, 40, 12
    grid = tile_grid(h, w, size, overlap)
    merger = StripMerger(2, w, size, merge, overlap)
    full = np.full((2, h, w), -np.inf if merge == "max" else 0.0, np.float32)
    weight = np.zeros((2, h, w), np.float32)
    streamed = []
    for r, row in enumerate(grid):
        for t in row:
            for e in range(2):
                if rng.random() < 0.2:  # a tile an expression did not run on
                    continue
                logits = rng.normal(0, 3, (t.height, t.width)).astype(np.float32)
                merger.add(e, t, logits)
                region = (e, slice(t.y0, t.y0 + t.height), slice(t.x0, t.x0 + t.width))
                ramp = ramp_weights(t.height, t.width, overlap)
                if merge == "max":
                    full[region] = np.maximum(full[region], logits)
                else:
                    full[region] += ramp * logits
                    weight[region] += ramp
        streamed.append(merger.take(grid[r + 1][0].y0 if r + 1 < len(grid) else h))
    if merge == "blend":
        full = np.where(weight > 0, full / np.maximum(weight, 1e-12), -np.inf)
    np.testing.assert_allclose(np.concatenate(streamed, axis=1), full, rtol=1e-6, atol=1e-5)


def test_one_tile_scene_is_exactly_the_plain_result(setup, tmp_path):
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)
    path = tmp_path / "small.png"
    Image.fromarray(picture).save(path)
    for mode in ("overview", "tiles"):
        results, masks = _segment(setup, path, tmp_path / mode, mode=mode)
        plain = setup["predictor"].predict_batch([str(path)], [TEXTS])[0]
        for r, m, p in zip(results, masks, plain):
            assert np.array_equal(m, p.mask.numpy()) and m.any()
            assert (r.object_score, r.iou_pred, r.tiles_run) == (p.object_score, p.iou_pred, 1)


@pytest.mark.parametrize("merge", ["max", "blend"])
def test_tiled_merge_equals_full_resolution_reference(setup, tmp_path, merge):
    results, masks = _segment(setup, setup["scene"], tmp_path, mode="tiles", merge=merge, overlap=16)
    reference = _reference(setup, setup["scene"], merge, 16)
    assert [r.tiles_run for r in results] == [12, 12]
    for k, (r, m) in enumerate(zip(results, masks)):
        assert m.shape == (150, 170) and 0 < m.sum() < m.size
        assert np.array_equal(m, reference[k]) and r.area_px == int(m.sum())


def test_mask_keeps_georeference_and_is_a_cog(setup, tmp_path):
    _segment(setup, setup["scene"], tmp_path, mode="tiles")
    with rasterio.open(setup["scene"]) as src, rasterio.open(tmp_path / "m0.tif") as out:
        assert out.crs == src.crs == rasterio.crs.CRS.from_string(CRS)
        assert out.transform == src.transform and (out.height, out.width) == (150, 170)
        assert out.dtypes == ("uint8",) and set(np.unique(out.read(1))) <= {0, 255}
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.compression is not None and out.compression.name == "deflate"


def test_polygons_rasterise_back_to_the_mask(setup, tmp_path):
    _segment(setup, setup["scene"], tmp_path, mode="tiles")
    path = str(tmp_path / "m0.tif")
    mask = read_mask(path)
    with rasterio.open(path) as src:
        crs, transform = src.crs, src.transform
    native = list(mask_polygons(path, "native"))
    wgs84 = list(mask_polygons(path, "wgs84"))
    assert len(native) == len(wgs84) > 0
    lon, lat = np.asarray(wgs84[0]["coordinates"][0]).T
    assert 14 < lon.min() and lon.max() < 16 and 44 < lat.min() and lat.max() < 46  # UTM 33N, 5000 km north
    back = [transform_geom("EPSG:4326", crs, p) for p in wgs84]
    for polygons in (native, back):
        raster = rasterize([(p, 1) for p in polygons], out_shape=mask.shape, transform=transform).astype(bool)
        assert _iou(raster, mask) >= 0.99


def test_cli_scene_writes_rasters_vectors_and_jsonl(setup, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--no-progress", "--out", str(out),
            "--image", str(setup["scene"]), "--scene", "--scene-mode", "tiles", "--batch-size", "4",
            "--tile-overlap", "16"]
    assert main(args + ["--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    lines = [json.loads(x) for x in (out / JSONL).read_text().splitlines()]
    assert [(x["index"], x["expression"]) for x in lines] == list(enumerate(TEXTS))
    for k, x in enumerate(lines):
        stem = f"scene_{k}_" + ("the-red-ship" if k == 0 else "the-largest-white-building-at-the-top-le")
        assert x["mask_geotiff"] == stem + ".tif" and x["geojson"] == stem + ".geojson"
        mask = read_mask(str(out / x["mask_geotiff"]))
        rle = {"size": x["rle"]["size"], "counts": x["rle"]["counts"].encode("ascii")}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask) and x["area_px"] == int(mask.sum())
        assert (x["height"], x["width"]) == (150, 170) and x["scene"]["tiles_run"] == 12
        geojson = json.loads((out / x["geojson"]).read_text())
        assert geojson["type"] == "FeatureCollection" and "crs" not in geojson  # RFC 7946: WGS 84 implied
        assert x["vector_crs"] == "wgs84" and x["crs"] == CRS
    assert (out / "scene_overview.png").is_file()
    assert main(args + ["--text", TEXTS[0], "--vector-crs", "native", "--out", str(tmp_path / "n")]) == 0
    native = json.loads((tmp_path / "n" / "scene_0_the-red-ship.geojson").read_text())
    assert native["crs"]["properties"]["name"] == CRS


def test_plain_png_scene_uses_pixel_coordinates(setup, tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "plain.png"
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--no-progress", "--quiet", "--out",
                 str(out), "--image", str(path), "--scene", "--text", TEXTS[0]]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(out / "plain_0_the-red-ship.tif") as src:
            assert src.crs is None and src.transform.is_identity and (src.height, src.width) == (70, 100)
    geojson = json.loads((out / "plain_0_the-red-ship.geojson").read_text())
    assert "pixel" in geojson["crs"]["properties"]["name"]
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in geojson["features"]])
    assert xy.min() >= 0 and xy[:, 0].max() <= 100 and xy[:, 1].max() <= 70


def test_gated_coarse_pass_runs_no_tile(setup, tmp_path):
    """overview mode: when the whole scene says "no target", nothing else runs and the masks are empty."""
    ckpt = make_checkpoint(tmp_path / "gated.pt", setup["config"], object_bias=-50.0)
    gated = {**setup, "predictor": RSAMPredictor.load(str(ckpt), device="cpu")}
    results, masks = _segment(gated, setup["scene"], tmp_path, mode="overview")
    assert all(r.no_target and r.tiles_run == 0 and r.area_px == 0 for r in results)
    assert not any(m.any() for m in masks)


def test_overview_mode_is_the_tiled_merge_inside_the_coarse_region(setup, tmp_path, monkeypatch):
    """Every tile covering a wanted coarse cell runs, so (no tile gated) overview mode's mask is exactly the
    tiles-mode mask kept inside the wanted cells. A random model wants every cell: keep the top-left quarter."""
    import rsam.scene.run as scene_run

    kept = []

    def top_left_only(*args, **kwargs):
        coarse = coarse_pass(*args, **kwargs)
        for c in coarse:
            r = c.wanted.shape[0]
            c.wanted[:] = False
            c.wanted[: r // 4, : r // 4] = True
        kept.extend(coarse)
        return coarse

    monkeypatch.setattr(scene_run, "coarse_pass", top_left_only)
    results, masks = _segment(setup, setup["scene"], tmp_path, mode="overview")
    _, tile_masks = _segment(setup, setup["scene"], tmp_path / "t", mode="tiles")
    for r, c, m, t in zip(results, kept, masks, tile_masks):
        allowed = c.allowed(0, 0, 150, 170)
        assert r.tiles_run == 1 and (r.object_score, r.no_target) == (c.object_score, False)
        assert np.array_equal(m, t & allowed) and m.any() and not m[40:].any()


def _run_main(setup, path, capsys) -> tuple:
    status = main(["--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--no-progress", "--out",
                   str(setup["tmp"] / "err"), "--image", str(path), "--scene", "--text", TEXTS[0]])
    err = capsys.readouterr().err.strip().splitlines()
    return status, err


def test_non_raster_and_truncated_files_are_one_line_exit_2(setup, tmp_path, capsys):
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(setup["scene"].read_bytes()[:4000])
    for path in (text, truncated):
        status, err = _run_main(setup, path, capsys)
        assert status == 2 and len(err) == 1 and str(path) in err[0], err


def test_huge_scene_fails_before_any_tile(setup, tmp_path, capsys):
    path = tmp_path / "huge.tif"
    with rasterio.open(path, "w", driver="GTiff", height=100_000, width=100_000, count=3, dtype="uint8",
                       tiled=True, compress="deflate", BIGTIFF="YES", SPARSE_OK="TRUE", crs=CRS,
                       transform=from_origin(500000, 5000000, 0.5, 0.5)):
        pass  # nothing written: a sparse file of a few kilobytes
    status, err = _run_main(setup, path, capsys)
    assert status == 2 and len(err) == 1 and "gigapixels" in err[0] and str(path) in err[0]
    assert not (setup["tmp"] / "err" / "huge_0_the-red-ship.tif").exists()


def test_auto_scene_mode_above_the_documented_size(setup, tmp_path, monkeypatch):
    import rsam.scene.cli as scene_cli
    from rsam.tools.predict import parse_args

    monkeypatch.setattr(scene_cli, "AUTO_SCENE_PIXELS", 150 * 170 - 1)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(small)
    args = parse_args(["--checkpoint", "x", "--image", "x", "--text", "t", "--out", str(tmp_path)])
    plain, scenes = scene_cli.split_scene_inputs([str(small), str(setup["scene"])], args, None, (2, 98), None)
    assert plain == [str(small)] and scenes == [str(setup["scene"])]
    args.scene = False
    assert scene_cli.split_scene_inputs([str(setup["scene"])], args, None, (2, 98), None)[1] == []


def test_synthetic_scene_is_georeferenced_with_its_objects(tmp_path):
    path = tmp_path / "s.tif"
    placed = write_synthetic_scene(str(path), 300, 260, objects=5, seed=2, object_size=64)
    assert len(placed) == 5
    with rasterio.open(path) as src:
        assert src.crs == rasterio.crs.CRS.from_string(CRS) and src.count == 3 and src.block_shapes[0] == (512, 512)
        image = np.moveaxis(src.read(), 0, -1)
    listed = json.loads(Path(str(path) + ".objects.json").read_text())
    assert [o["category"] for o in listed] == [p.category for p in placed]
    for p in placed:  # each object differs from the smooth ground around it
        assert 0 <= p.y0 < p.y1 <= 300 and 0 <= p.x0 < p.x1 <= 260
        assert image[p.y0:p.y1, p.x0:p.x1].std() > 10
