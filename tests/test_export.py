"""rsam-export (rsam/tools/export.py): training and official checkpoints -> pretrained directories.

What is checked: a best.pt written by the real trainer (tiny config, 1 epoch on synthetic data) exports to a
directory that predicts exactly like the checkpoint, with the run's best validation metric in the card (or
the metrics.json given with --metrics); an official-format bare state dict (with the official video-only
leftovers) exports with --config; every bad input is exit status 2 with one line naming it; --push-to-hub
goes through HfApi (monkeypatched: no network); the installed module runs as a script.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from rsam.predictor import RSAMPredictor
from rsam.pretrained import CARD_NAME, CONFIG_NAME, read_pretrained
from rsam.tools.export import main
from tiny_rsam_setup import REPO, TINY_CONFIG, make_checkpoint, tiny_checkpoint, tiny_config, write_vocab

TEXTS = ["the red ship", "a vehicle at the top left"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """best.pt of one epoch of the real trainer on 24 synthetic 64 px images."""
    from rsam.data.synthetic import generate
    from training.train import apply_flags, compose_config, parse_args
    from training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("export")
    root = tmp / "data"
    scenes = generate(str(root), num_images=24, size=64, seed=0, min_objects=2, max_objects=2,
                      val_fraction=0.25, test_fraction=0.0)
    words = sorted({w for s in scenes for d in s.descriptions for w in re.findall(r"\w+|[^\w\s]", d.lower())})
    vocab = write_vocab(root / "vocab.txt", words)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = parse_args(["-c", str(TINY_CONFIG), "--num-gpus", "0", "--log-dir", str(tmp / "exp")])
        cfg = apply_flags(compose_config(str(TINY_CONFIG), [
            f"scratch.data_root={root}", f"scratch.vocab={vocab}", "scratch.resolution=64",
            "scratch.train_batch_size=4", "scratch.val_batch_size=8", "trainer.progress_bar=false",
            "trainer.test_split=null", "trainer.max_epochs=1", "trainer.log_every=100"]), args)
        trainer = Trainer(cfg)
        trainer.run()
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    best = tmp / "exp" / "checkpoints" / "best.pt"
    assert best.is_file()
    image = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    return {"tmp": tmp, "best": best, "vocab": vocab, "image": image}


def _predictions(predictor, image):
    predictor.set_image(image)
    return predictor.predict(TEXTS)


def test_export_training_checkpoint(trained, capsys):
    out = trained["tmp"] / "rsam-tiny"
    assert main(["--checkpoint", str(trained["best"]), "--out", str(out), "--name", "RSAM tiny demo"]) == 0
    assert "wrote" in capsys.readouterr().out
    a = _predictions(RSAMPredictor.from_checkpoint(trained["best"], device="cpu"), trained["image"])
    b = _predictions(RSAMPredictor.from_pretrained(out, device="cpu"), trained["image"])
    for x, y in zip(a, b):
        assert torch.equal(x.logits, y.logits) and x.object_score == y.object_score
    best = torch.load(trained["best"], weights_only=True)
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["info"]["epoch"] == best["epoch"] and record["info"]["source_checkpoint"] == "best.pt"
    assert record["info"]["metrics"]["metrics"]["mIoU"] == pytest.approx(best["best"]["mIoU"])
    card = (out / CARD_NAME).read_text()
    assert "# RSAM tiny demo" in card and f"| mIoU | {100 * best['best']['mIoU']:.2f} % |" in card
    assert "Evaluation: split val" in card and "data (risors format)" in card  # data from the training config

    # --metrics: an eval.py metrics.json replaces the validation number; --force to overwrite
    metrics = trained["tmp"] / "metrics.json"
    metrics.write_text(json.dumps({"split": "test", "convention": "standard", "resolution": "network",
                                   "metrics": {"mIoU": 0.4321, "oIoU": 0.55, "num_expressions": 12}}))
    assert main(["--checkpoint", str(trained["best"]), "--out", str(out), "--metrics", str(metrics)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["--checkpoint", str(trained["best"]), "--out", str(out), "--metrics", str(metrics),
                 "--force"]) == 0
    card = (out / CARD_NAME).read_text()
    assert "| mIoU | 43.21 % |" in card and "| num_expressions | 12 |" in card and "split test" in card


def test_export_official_state_dict_with_config(tmp_path, capsys):
    vocab = write_vocab(tmp_path / "vocab.txt")
    overrides = ["scratch.resolution=64", f"scratch.vocab={vocab}"]
    ours = make_checkpoint(tmp_path / "ours.pt", tiny_config(overrides))
    sd = dict(torch.load(ours, weights_only=True)["model"])
    sd["maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)  # an official video-only leftover: dropped on load
    sd["obj_ptr_proj.layers.0.weight"] = torch.zeros(64, 64)
    official = tmp_path / "official.pt"
    torch.save(sd, official)

    assert main(["--checkpoint", str(official), "--out", str(tmp_path / "no_config")]) == 2
    assert "holds no config" in capsys.readouterr().err
    out = tmp_path / "official_dir"
    assert main(["--checkpoint", str(official), "--config", str(TINY_CONFIG), "--out", str(out), *overrides]) == 0
    written = read_pretrained(out).state_dict
    assert "maskmem_tpos_enc" not in written and set(written) == set(sd) - {"maskmem_tpos_enc",
                                                                           "obj_ptr_proj.layers.0.weight"}
    assert "Not evaluated" in (out / CARD_NAME).read_text()
    image = np.random.default_rng(1).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    a = _predictions(RSAMPredictor.from_checkpoint(ours, device="cpu"), image)
    b = _predictions(RSAMPredictor.from_pretrained(out, device="cpu"), image)
    assert all(torch.equal(x.logits, y.logits) for x, y in zip(a, b))

    # a config whose model does not fit the weights: exit 2, the differing key named
    assert main(["--checkpoint", str(official), "--config", str(TINY_CONFIG), "--out", str(tmp_path / "bad"),
                 *overrides, "model.text_encoder.hidden_size=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 30 and "text_encoder" in err and "Traceback" not in err


def test_export_usage_errors(tmp_path, capsys):
    def fails(argv, expected):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err

    fails(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], "checkpoint not found")
    _, _, ckpt = tiny_checkpoint(tmp_path, "c.pt")
    fails(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")],
          "m.json: file not found")
    (tmp_path / "m.json").write_text("[1, 2]")
    fails(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")],
          "m.json: must hold a JSON object, got list")
    (tmp_path / "file").write_text("x")
    fails(["--checkpoint", str(ckpt), "--out", str(tmp_path / "file")], "is a file")
    fails(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "x=1"], "overrides need --config")
    assert main(["--out", "x"]) == 2  # argparse: --checkpoint is required
    assert "--checkpoint" in capsys.readouterr().err


def test_export_push_to_hub(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploaded.update(created=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploaded.update(
        files=sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir()), **kw) or "ok")
    _, _, ckpt = tiny_checkpoint(tmp_path, "c.pt")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "d"), "--push-to-hub", "user/rsam-x"]) == 0
    assert uploaded["created"] == "user/rsam-x" and uploaded["repo_id"] == "user/rsam-x"
    assert uploaded["files"] == sorted(["README.md", "config.json", "model.safetensors", "vocab.txt"])
    assert 'from_pretrained("user/rsam-x")' in (tmp_path / "d" / CARD_NAME).read_text()

    def refuse(self, **kw):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "e"), "--push-to-hub", "user/rsam-x"]) == 2
    assert "was written, but the upload to user/rsam-x failed (RuntimeError: 401" in capsys.readouterr().err


def test_export_as_a_script(tmp_path):
    _, _, ckpt = tiny_checkpoint(tmp_path, "c.pt")
    proc = subprocess.run([sys.executable, "-m", "rsam.tools.export", "--checkpoint", str(ckpt), "--out",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "rsam.tools.export", "--checkpoint", str(ckpt), "--out",
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert bad.returncode == 2 and "not empty" in bad.stderr
