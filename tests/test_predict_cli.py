"""rsam-predict (rsam/tools/predict.py, predict_inputs.py) on a tiny random checkpoint (64 px network, CPU).

What is checked: every exit status (0 all written; 1 some image failed, named on stderr, the others written;
2 usage errors: flags, unavailable device, missing checkpoint, checkpoint/config mismatch, texts-file
problems), as a real process too (``python -m rsam.tools.predict``); folder and glob inputs; texts files in
JSON and CSV matched by path or file name; predictions.jsonl RLEs decode (pycocotools) exactly to the written
PNG masks; --batch-size 8 writes what --batch-size 1 writes; 16-bit and multi-band rasters with --bands and
the 2-98 % stretch; GeoTIFF in -> GeoTIFF masks with the same georeference (rasterio); pretrained directories.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rsam.tools.predict import JSONL, main
from rsam.tools.predict_inputs import read_image, to_rgb8
from tiny_rsam_setup import REPO, TINY_CONFIG, tiny_checkpoint

TEXTS = ["the red ship", "the largest white building at the top left"]
SIZES = [(45, 75), (64, 64), (30, 90), (80, 50), (33, 33), (70, 40), (50, 100), (64, 48), (40, 60), (90, 70)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_cli")
    vocab, config, ckpt = tiny_checkpoint(tmp)
    rng = np.random.default_rng(0)
    folder = tmp / "images"
    folder.mkdir()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"scene_{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return {"tmp": tmp, "vocab": vocab, "config": config, "ckpt": ckpt, "folder": folder}


def run(setup, out, *extra, images=None):
    images = images if images is not None else [str(setup["folder"] / "scene_00.png")]
    return main(["--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--no-progress", "--quiet",
                 "--out", str(out), "--image", *images, *extra])


def read_jsonl(out: Path) -> list:
    return [json.loads(line) for line in (out / JSONL).read_text().splitlines()]


def test_success_outputs_and_rle_decodes_to_png(setup, tmp_path):
    out = tmp_path / "out"
    assert run(setup, out, "--text", TEXTS[0], "--text", TEXTS[1], "--fill-holes", "4") == 0
    lines = read_jsonl(out)
    assert [(r["index"], r["expression"]) for r in lines] == [(0, TEXTS[0]), (1, TEXTS[1])]
    for r in lines:
        png = np.asarray(Image.open(out / r["mask"]))
        assert png.shape == (45, 75) == (r["height"], r["width"]) and set(np.unique(png)) <= {0, 255}
        rle = {"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode("ascii")}
        assert r["rle"]["size"] == [45, 75] and isinstance(r["rle"]["counts"], str)
        assert np.array_equal(mask_utils.decode(rle).astype(bool), png == 255)
        assert int(mask_utils.area(rle)) == r["area_px"] == int((png == 255).sum())
        assert isinstance(r["iou_pred"], float) and isinstance(r["object_score"], float)
        assert r["no_target"] is False and r["overlay"] == "scene_00_overlay.png"
    overlay = Image.open(out / "scene_00_overlay.png")
    overlay.load()
    assert overlay.mode == "RGB" and overlay.width >= 480
    record = json.loads((out / "scene_00_predictions.json").read_text())
    assert [p["rle"] for p in record["predictions"]] == [r["rle"] for r in lines]


def test_folder_and_glob_inputs(setup, tmp_path):
    out = tmp_path / "folder"
    assert run(setup, out, "--text", TEXTS[0], images=[str(setup["folder"])]) == 0
    names = [Path(r["image"]).name for r in read_jsonl(out)]
    assert names == sorted(f"scene_{i:02d}.png" for i in range(len(SIZES)))  # sorted; notes.txt skipped
    out = tmp_path / "glob"
    assert run(setup, out, "--text", TEXTS[0], images=[str(setup["folder"] / "scene_0[3-5].png"),
                                                       str(setup["folder"] / "scene_03.png")]) == 0
    assert [Path(r["image"]).name for r in read_jsonl(out)] == ["scene_03.png", "scene_04.png", "scene_05.png"]


def test_texts_files_json_and_csv(setup, tmp_path, capsys):
    folder = setup["folder"]
    texts = tmp_path / "texts.json"  # a relative path (to the texts file's folder), a file name, an unknown key
    rel = os.path.relpath(folder / "scene_01.png", tmp_path)
    texts.write_text(json.dumps({rel: ["a vehicle", "the red ship"],
                                 "scene_02.png": "the largest building", "unknown.png": ["x"]}))
    out = tmp_path / "json"
    assert run(setup, out, "--texts-file", str(texts),
               images=[str(folder / "scene_01.png"), str(folder / "scene_02.png")]) == 0
    got = [(Path(r["image"]).name, r["expression"]) for r in read_jsonl(out)]
    assert got == [("scene_01.png", "a vehicle"), ("scene_01.png", "the red ship"),
                   ("scene_02.png", "the largest building")]
    assert "1 key(s) of" in capsys.readouterr().err  # unknown.png matched no image: a warning

    csv_file = tmp_path / "texts.csv"
    csv_file.write_text(f"image,expression\nscene_03.png,the red ship\nscene_03.png,a vehicle\n"
                        f"{folder / 'scene_04.png'},\"the building, left\"\n", encoding="utf-8")
    out = tmp_path / "csv"
    # scene_05 is not named in the texts file: skipped with one summary line, not a failure
    assert run(setup, out, "--texts-file", str(csv_file), images=[str(folder / f"scene_0{i}.png")
                                                                  for i in (3, 4, 5)]) == 0
    captured = capsys.readouterr()
    assert "1 of 3 image(s) are not named in" in captured.out and "failed" not in captured.err
    got = [(Path(r["image"]).name, r["expression"]) for r in read_jsonl(out)]
    assert got == [("scene_03.png", "the red ship"), ("scene_03.png", "a vehicle"),
                   ("scene_04.png", "the building, left")]


def test_batch_size_8_writes_what_batch_size_1_writes(setup, tmp_path):
    one, eight = tmp_path / "b1", tmp_path / "b8"
    assert run(setup, one, "--text", TEXTS[0], "--text", TEXTS[1], images=[str(setup["folder"])]) == 0
    assert run(setup, eight, "--text", TEXTS[0], "--text", TEXTS[1], "--batch-size", "8",
               images=[str(setup["folder"])]) == 0
    a, b = read_jsonl(one), read_jsonl(eight)
    assert len(a) == len(b) == 2 * len(SIZES)
    for x, y in zip(a, b):
        assert (x["image"], x["expression"], x["mask"]) == (y["image"], y["expression"], y["mask"])
        assert x["iou_pred"] == pytest.approx(y["iou_pred"], abs=1e-5)
        assert x["object_score"] == pytest.approx(y["object_score"], abs=1e-4)
        ma = mask_utils.decode({"size": x["rle"]["size"], "counts": x["rle"]["counts"].encode()})
        mb = mask_utils.decode({"size": y["rle"]["size"], "counts": y["rle"]["counts"].encode()})
        assert (ma != mb).sum() <= 2, "batched masks differ beyond float noise at the threshold"


def test_failures_exit_1_and_the_rest_is_written(setup, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    images = [str(setup["folder"] / "scene_00.png"), str(bad), str(tmp_path / "missing.jpg")]
    assert run(setup, out, "--text", TEXTS[0], images=images) == 1
    err = capsys.readouterr().err
    assert "broken.png: cannot read the image" in err and "image not found: " in err and "missing.jpg" in err
    assert "2 of 3 image(s) failed" in err and "Traceback" not in err
    assert [Path(r["image"]).name for r in read_jsonl(out)] == ["scene_00.png"]


def test_usage_errors_exit_2(setup, tmp_path, capsys, monkeypatch):
    def usage(expected, *extra, images=None, checkpoint=None):
        argv = ["--checkpoint", str(checkpoint or setup["ckpt"]), "--no-progress", "--out", str(tmp_path / "o"),
                "--image", *(images or [str(setup["folder"] / "scene_00.png")]), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    usage("--device cuda: no CUDA GPU is available", "--text", "x", "--device", "cuda")
    usage("is not a device", "--text", "x", "--device", "tpu9")
    usage("checkpoint not found", "--text", "x", checkpoint=tmp_path / "nope.pt")
    usage("model.text_encoder.hidden_size: checkpoint 64, config 32", "--text", "x", "--device", "cpu",
          "--config", str(TINY_CONFIG), "scratch.resolution=64", f"scratch.vocab={setup['vocab']}",
          "model.text_encoder.hidden_size=32")
    usage("with --text (repeatable) or with --texts-file")
    usage("not both or neither", "--text", "x", "--texts-file", str(tmp_path / "t.json"))
    usage("t.json: file not found", "--texts-file", str(tmp_path / "t.json"))
    (tmp_path / "t.csv").write_text("file,text\na.png,x\n")
    usage("needs the columns image,expression", "--texts-file", str(tmp_path / "t.csv"))
    (tmp_path / "t.json").write_text('{"a.png": []}')
    usage("key 'a.png': expected an expression", "--texts-file", str(tmp_path / "t.json"))
    (tmp_path / "empty").mkdir()
    usage("the folder holds no images", "--text", "x", images=[str(tmp_path / "empty")])
    usage("no image file matches", "--text", "x", images=[str(tmp_path / "*.png")])
    usage("--bands '3,2': give 3 band numbers", "--text", "x", "--bands", "3,2")
    usage("--stretch '98,2'", "--text", "x", "--stretch", "98,2")
    usage("--batch-size must be >= 1", "--text", "x", "--batch-size", "0")
    usage("overrides need --config", "--text", "x", "model.image_size=32")
    usage("invalid choice", "--text", "x", "--overlay-style", "glow")  # argparse's own message


def _rsam_predict(setup, *argv, cwd=None):
    command = [str(Path(sys.executable).parent / "rsam-predict"), "--checkpoint", str(setup["ckpt"]), "--device",
               "cpu", "--no-progress", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(cwd or REPO))


def test_texts_file_chooses_the_images_and_names_only_some(setup, tmp_path):
    """rsam-predict: a texts file naming some images of a folder runs those (exit 0, one summary line); without
    --image the texts file's keys are the images."""
    folder = setup["folder"]
    texts = tmp_path / "texts.csv"
    texts.write_text(f"image,expression\n{folder / 'scene_01.png'},the red ship\nscene_02.png,a vehicle\n")
    (tmp_path / "scene_02.png").write_bytes((folder / "scene_02.png").read_bytes())  # beside the texts file
    some = _rsam_predict(setup, "--image", str(folder), "--texts-file", str(texts), "--out", str(tmp_path / "a"))
    assert some.returncode == 0, some.stderr[-2000:]
    assert f"{len(SIZES) - 2} of {len(SIZES)} image(s) are not named in {texts}" in some.stdout
    assert sorted(Path(r["image"]).name for r in read_jsonl(tmp_path / "a")) == ["scene_01.png", "scene_02.png"]
    alone = _rsam_predict(setup, "--texts-file", str(texts), "--out", str(tmp_path / "b"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert [r["image"] for r in read_jsonl(tmp_path / "b")] == [str(folder / "scene_01.png"),
                                                                str(tmp_path / "scene_02.png")]


def test_out_that_is_a_file_and_a_failed_run_keeps_the_previous_results(setup, tmp_path):
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    proc = _rsam_predict(setup, "--image", str(setup["folder"] / "scene_00.png"), "--text", "x",
                         "--out", str(a_file))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"rsam-predict: error: --out {a_file} is a file; give a folder (it is created when missing)"]
    assert a_file.read_text() == "keep me"
    out = tmp_path / "out"
    assert _rsam_predict(setup, "--image", str(setup["folder"] / "scene_00.png"), "--text", TEXTS[0],
                         "--out", str(out)).returncode == 0
    before = (out / JSONL).read_text()
    killed = _rsam_predict(setup, "--image", str(setup["folder"]), "--text", TEXTS[0], "--out", str(out),
                           "--device", "nosuch")  # refused before anything is written
    assert killed.returncode == 2 and (out / JSONL).read_text() == before
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A 140-byte PNG whose header declares ``width`` x ``height`` RGB pixels (its data holds one row)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_an_oversized_image_is_one_refusal_and_the_rest_is_written(setup, tmp_path):
    """A picture whose header declares more pixels than the limit is refused before decoding, named in one line;
    the other images of the folder are still written (exit 1), in scene mode's automatic choice as well."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        (folder / name).write_bytes((setup["folder"] / "scene_00.png").read_bytes())
    _png_declaring(folder / "b_bomb.png", 20000, 20000)
    for mode in ([], ["--no-scene"]):
        out = tmp_path / f"out{len(mode)}"
        proc = _rsam_predict(setup, "--image", str(folder), "--text", TEXTS[0], "--out", str(out), "--quiet", *mode)
        assert proc.returncode == 1, proc.stderr[-2000:]
        refused = [line for line in proc.stderr.splitlines() if "b_bomb.png" in line]
        assert len(refused) == 1 and "400000000 pixels" in refused[0] and "Traceback" not in proc.stderr
        assert sorted(Path(r["image"]).name for r in read_jsonl(out)) == ["a.png", "c.png"]
    if importlib.util.find_spec("rasterio") is None:
        return
    import rasterio

    sparse = tmp_path / "sparse" / "huge.tif"  # a few KB on disk, 30000 x 30000 x 3 declared
    sparse.parent.mkdir()
    with rasterio.open(sparse, "w", driver="GTiff", width=30000, height=30000, count=3, dtype="uint8", tiled=True,
                       compress="deflate", sparse_ok=True):
        pass
    proc = _rsam_predict(setup, "--image", str(sparse), str(folder / "a.png"), "--text", TEXTS[0], "--no-scene",
                         "--out", str(tmp_path / "tiff"), "--quiet")
    assert proc.returncode == 1 and "huge.tif: 30000 x 30000 px is over the" in proc.stderr, proc.stderr[-2000:]


def test_as_a_process_exit_statuses(setup, tmp_path):
    """The real exit status of ``python -m rsam.tools.predict`` (what the rsam-predict script returns)."""
    cmd = [sys.executable, "-m", "rsam.tools.predict", "--checkpoint", str(setup["ckpt"]), "--device", "cpu",
           "--text", TEXTS[0], "--out", str(tmp_path / "out"), "--image", str(setup["folder"] / "scene_00.png")]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stderr.strip() == "" and "[" not in ok.stdout.splitlines()[0]  # no Python list, no bar off a TTY
    assert (tmp_path / "out" / "scene_00_overlay.png").is_file()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    failed = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert failed.returncode == 1 and "bad.png: cannot read the image" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_pretrained_directory_as_checkpoint(setup, tmp_path, capsys):
    from rsam.predictor import RSAMPredictor

    directory = RSAMPredictor.from_checkpoint(setup["ckpt"], device="cpu").save_pretrained(tmp_path / "dir")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(setup, a, "--text", TEXTS[0]) == 0
    assert main(["--checkpoint", str(directory), "--device", "cpu", "--no-progress", "--quiet", "--out", str(b),
                 "--text", TEXTS[0], "--image", str(setup["folder"] / "scene_00.png")]) == 0
    assert [r["rle"] for r in read_jsonl(a)] == [r["rle"] for r in read_jsonl(b)]
    # a config.json whose model does not instantiate: exit 2, the target named, no traceback
    record = json.loads((directory / "config.json").read_text())
    record["model"]["_target_"] = "rsam.modeling.nowhere.Model"
    (directory / "config.json").write_text(json.dumps(record))
    assert main(["--checkpoint", str(directory), "--device", "cpu", "--out", str(b), "--text", TEXTS[0],
                 "--image", str(setup["folder"] / "scene_00.png")]) == 2
    err = capsys.readouterr().err
    assert "rsam.modeling.nowhere" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ rasters
def test_stretch_rule():
    band = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10  # 0 ... 990
    rgb, note = to_rgb8(band[..., None], None, (2.0, 98.0), "x")
    lo, hi = np.percentile(band.astype(np.float64), [2, 98])
    expected = np.round(np.clip((band - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and "stretched per band, 2-98 %" in note
    stack = np.stack([band, np.full_like(band, 7), band[::-1]], axis=-1)
    rgb, note = to_rgb8(stack, (3, 2, 1), (0.0, 100.0), "x")
    assert np.array_equal(rgb[..., 2], np.round(band / 990 * 255).astype(np.uint8))
    assert not rgb[..., 1].any()  # a constant band has no range: 0
    assert "bands 3,2,1 of 3" in note
    u8 = np.random.default_rng(0).integers(0, 256, (5, 5, 4), dtype=np.uint8)
    assert np.array_equal(to_rgb8(u8, None, (2, 98), "x")[0], u8[..., :3])  # 8-bit values are kept


def test_16bit_grey_png_and_colour_tiff(setup, tmp_path):
    g16 = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    loaded = read_image(str(tmp_path / "g16.png"))
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (30, 40, 3) and "uint16 stretched" in loaded.note
    cv2 = pytest.importorskip("cv2")
    rgb16 = np.random.default_rng(0).integers(0, 4000, (30, 40, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    loaded = read_image(str(tmp_path / "rgb16.png"), bands=(1, 2, 3))
    assert np.array_equal(loaded.rgb, to_rgb8(rgb16, None, (2, 98), "x")[0])
    out = tmp_path / "out"
    assert run(setup, out, "--text", TEXTS[0], images=[str(tmp_path / "g16.png"), str(tmp_path / "rgb16.png")]) == 0
    assert [r["height"] for r in read_jsonl(out)] == [30, 30]


def _write_tif(path, data, crs=None, transform=None, nodata=None):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    c, h, w = data.shape
    with warnings.catch_warnings():  # an identity transform: "not georeferenced", which is the point
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        _write(rasterio, path, data, crs, transform or Affine.identity(), nodata, c, h, w)


def _write(rasterio, path, data, crs, transform, nodata, c, h, w):
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=str(data.dtype), crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(data)


def test_multiband_16bit_geotiff_with_bands(setup, tmp_path, capsys):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    rng = np.random.default_rng(3)
    data = rng.integers(100, 12000, (5, 48, 56)).astype(np.uint16)  # 5 bands, 16-bit
    transform = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4650000.0)  # 10 m pixels, UTM 33N
    _write_tif(tmp_path / "s2.tif", data, crs="EPSG:32633", transform=transform)
    out = tmp_path / "out"
    assert run(setup, out, "--text", TEXTS[0], images=[str(tmp_path / "s2.tif")]) == 1
    assert "5 bands; pick three" in capsys.readouterr().err
    assert run(setup, out, "--text", TEXTS[0], "--bands", "3,2,1", images=[str(tmp_path / "s2.tif")]) == 0
    (line,) = read_jsonl(out)
    expected = to_rgb8(np.moveaxis(data, 0, -1), (3, 2, 1), (2.0, 98.0), "x")[0]
    assert np.array_equal(read_image(str(tmp_path / "s2.tif"), (3, 2, 1)).rgb, expected)
    # the same masks as the predictor on the stretched image
    from rsam.predictor import RSAMPredictor

    predictor = RSAMPredictor.from_checkpoint(setup["ckpt"], device="cpu")
    predictor.set_image(expected)
    png = np.asarray(Image.open(out / line["mask"])) == 255
    assert np.array_equal(predictor.predict(TEXTS[0])[0].mask.numpy(), png)
    # GeoTIFF mask: same CRS and transform, same pixels as the PNG
    with rasterio.open(out / line["mask_geotiff"]) as src:
        assert src.crs.to_epsg() == 32633 and src.transform == transform and src.count == 1
        assert np.array_equal(src.read(1) == 255, png)


def test_plain_8bit_tiff_without_georeference(setup, tmp_path):
    pytest.importorskip("rasterio")
    rgb = np.random.default_rng(4).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    _write_tif(tmp_path / "plain.tif", rgb)
    loaded = read_image(str(tmp_path / "plain.tif"))
    assert loaded.georef is None and loaded.note == "" and np.array_equal(loaded.rgb, np.moveaxis(rgb, 0, -1))
    out = tmp_path / "out"
    assert run(setup, out, "--text", TEXTS[0], images=[str(tmp_path / "plain.tif")]) == 0
    assert "mask_geotiff" not in read_jsonl(out)[0]
