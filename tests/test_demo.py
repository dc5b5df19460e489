"""The offline demo (training/demo.py, configs/rsam_demo_cpu.yaml) end to end, very shortened.

The full demo (`make demo`: 1500 images at 128 px, 10 epochs, test mIoU ~0.67) takes minutes and is not part
of the suite; here the same script runs the same tools on 30 images at 64 px for one epoch: dataset generation,
WordPiece vocabulary, training/train.py (same trainer and checkpoint format as the 800 px recipe),
training/eval.py, the text-shuffled evaluation and the overlays.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from training import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESOLUTION = 64


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, os.path.join(REPO, "training", "demo.py"), "--out", str(out), "--num-images", "30",
           "--overlays", "2", "--save-vis", "2", "--quiet",
           f"scratch.resolution={RESOLUTION}", "scratch.num_epochs=1", "scratch.val_batch_size=8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_last_line_is_the_json_report(demo_run):
    out, stdout = demo_run
    report = json.loads(stdout.strip().splitlines()[-1])
    for key in ("mIoU", "oIoU", "Pr@0.5", "text_shuffled_mIoU"):
        assert 0.0 <= report[key] <= 1.0, (key, report[key])
    assert report["wall_time_s"] > 0 and report["train_time_s"] > 0
    assert report["resolution"] == RESOLUTION and report["epochs"] == 1
    assert report["num_expressions"] > 0
    # the report is the eval script's metrics.json, not a number of its own
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert report["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-4)
    assert report["num_expressions"] == metrics["num_expressions"]
    shuffled = json.loads((out / "eval_text_shuffled" / "metrics.json").read_text())["metrics"]
    assert report["text_shuffled_mIoU"] == pytest.approx(shuffled["mIoU"], abs=1e-4)
    assert shuffled["num_expressions"] == metrics["num_expressions"]
    # it says where everything went
    for word in ("dataset", "checkpoint", "test metrics", "overlays"):
        assert word in stdout


def test_trained_through_the_real_trainer(demo_run):
    out, _ = demo_run
    run = out / "run"
    assert (run / "config.yaml").is_file() and (run / "logs" / "log.txt").is_file()
    ckpt = torch.load(run / "checkpoints" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "best", "rng", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 24 // 8  # 80% of 30 images = 24 train images, batch 8
    cfg = ckpt["config"]
    assert cfg["model"]["_target_"] == "rsam.modeling.rsam.RSAM" and cfg["model"]["image_size"] == RESOLUTION
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["model"]["freeze_text_encoder"] is False
    assert cfg["data"]["train"]["dataset"]["root"] == str(out / "data")
    # the random-init text encoder is trained here: it has its own optimizer groups
    names = [g["name"] for g in ckpt["optimizer"]["param_groups"]]
    assert any(n.startswith("text") for n in names), names
    assert (run / "checkpoints" / "best.pt").is_file()


def test_vocabulary_and_text_encoder_folder(demo_run):
    from rsam.data.tokenizer import RSAMTokenizer

    out, _ = demo_run
    folder = out / "text_encoder"
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 256 and lines[:5] == demo.SPECIAL_TOKENS
    bert = json.loads((folder / "config.json").read_text())
    assert bert["vocab_size"] == 256 and bert["hidden_size"] == 64 and bert["model_type"] == "bert"
    tok = RSAMTokenizer(str(folder), mode="standard")
    texts = [a["description"] for name in demo.read_split(str(out / "data"), "test")
             for a in demo.read_annotations(str(out / "data"), name)["annotations"]]
    ids = tok(texts).input_ids
    assert int(ids.max()) < 256
    unk = tok.hf_tokenizer.unk_token_id
    assert not (ids == unk).any(), "a test expression has a word the WordPiece vocabulary cannot spell"


def test_overlays_and_eval_pictures(demo_run):
    out, _ = demo_run
    overlays = sorted((out / "overlays").glob("*_overlay.png"))
    assert len(overlays) == 2
    for p in overlays:
        record = json.loads(p.with_name(p.name.replace("_overlay.png", "_predictions.json")).read_text())
        name = p.name.replace("_overlay.png", "")
        expected = [a["description"] for a in demo.read_annotations(str(out / "data"), name)["annotations"]]
        assert [r["expression"] for r in record["predictions"]] == expected
    assert len(list((out / "eval" / "vis").glob("*.png"))) >= 2


def test_shuffled_copy_moves_every_expression(tmp_path):
    from rsam.data.synthetic import generate

    root = tmp_path / "data"
    generate(str(root), 20, size=64, seed=3, test_fraction=0.5)
    n = demo.shuffled_copy(str(root), str(tmp_path / "shuffled"), "test", seed=0)
    names = demo.read_split(str(root), "test")
    before = [a for nm in names for a in demo.read_annotations(str(root), nm)["annotations"]]
    after = [a for nm in names for a in demo.read_annotations(str(tmp_path / "shuffled"), nm)["annotations"]]
    assert n == len(before) == len(after) > 2
    assert sorted(a["description"] for a in before) == sorted(a["description"] for a in after)
    assert [a["segmentation"] for a in before] == [a["segmentation"] for a in after]  # masks stay put
    moved = sum(a["description"] != b["description"] for a, b in zip(before, after))
    # every record got another record's text (a duplicate sentence may land back on an equal one)
    duplicates = len(before) - len({a["description"] for a in before})
    assert moved >= len(before) - 2 * duplicates
    assert demo.read_split(str(tmp_path / "shuffled"), "train") == []
    assert os.path.isfile(tmp_path / "shuffled" / "JPEGImages" / f"{names[0]}.jpg")
