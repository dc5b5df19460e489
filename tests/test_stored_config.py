"""A config stored with weights is data: hostile ones are refused before anything runs, by every entry point.

The reproduction of the issue: a pretrained directory (and a training checkpoint) whose config has one nested
value replaced by ``{"_target_": "torch.load", "f": "<dir>/extra.pkl", "weights_only": false}``, with a pickle
beside it that creates a marker file when it is loaded. Before the fix, ``rsam-predict --checkpoint <dir>`` ran
the payload. Every command must now exit 2 with one line naming the file and the key, and the marker must
never appear. Further variants: a ``_target_`` outside RSAM (``os.system``) and values that are not plain.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsam.build import build_from_checkpoint
from rsam.checkpoint import (StoredConfigError, build_stored, check_stored_config, load_weights, read_checkpoint,
                             register_stored_builder)
from rsam.checkpoint.stored_config import STORED_BUILDERS
from rsam.predictor import RSAMPredictor
from tests.tiny_rsam_setup import REPO, TINY_CONFIG, tiny_checkpoint

SCRIPTS = Path(sys.executable).parent


class _Payload:
    """Unpickling this creates ``marker``: the proof that a pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored_config")
    vocab, config, ckpt = tiny_checkpoint(root)
    directory = root / "pretrained"
    RSAMPredictor.from_checkpoint(ckpt, device="cpu").save_pretrained(directory)
    image = root / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    return {"root": root, "vocab": vocab, "config": config, "ckpt": ckpt, "dir": directory, "image": image}


def _hostile_pickle(folder: Path) -> tuple[Path, Path]:
    marker, pickled = folder / "MARKER", folder / "extra.pkl"
    pickled.write_bytes(pickle.dumps(_Payload(str(marker))))
    return pickled, marker


# The three kinds of hostile value, put in place of model.image_encoder.drop_path_rate.
def _torch_load(pickled: Path, marker: Path):
    return {"_target_": "torch.load", "f": str(pickled), "weights_only": False}


def _outside_rsam(pickled: Path, marker: Path):
    return {"_target_": "os.system", "command": f"touch {marker}"}


def _hydra_special(pickled: Path, marker: Path):
    return {"_target_": "rsam.modeling.rsam.RSAM", "_args_": [str(pickled)], "_partial_": True}


HOSTILE = {"torch.load": _torch_load, "os.system": _outside_rsam, "special keys": _hydra_special}
KEY = "model.image_encoder.drop_path_rate"


def _hostile_dir(setup, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    directory = tmp_path / "hostile_dir"
    directory.mkdir()
    for name in ("model.safetensors", "vocab.txt", "README.md"):
        (directory / name).write_bytes((setup["dir"] / name).read_bytes())
    record = json.loads((setup["dir"] / "config.json").read_text())
    pickled, marker = _hostile_pickle(tmp_path)
    record["model"]["image_encoder"]["drop_path_rate"] = HOSTILE[kind](pickled, marker)
    (directory / "config.json").write_text(json.dumps(record))
    return directory, marker


def _hostile_checkpoint(setup, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    state = torch.load(setup["ckpt"], weights_only=True)
    pickled, marker = _hostile_pickle(tmp_path)
    state["config"]["model"]["image_encoder"]["drop_path_rate"] = HOSTILE[kind](pickled, marker)
    path = tmp_path / "hostile.pt"
    torch.save(state, path)
    return path, marker


def _expected_words(source: Path) -> tuple[str, str]:
    """The file and the key the one-line message must name."""
    if source.is_dir():
        return str(source / "config.json"), KEY
    return str(source), f"config.{KEY}"


# ------------------------------------------------------------------------------------------------------------
# every entry point, as a user runs it (installed console scripts, python -c, training/train.py)


def _entry_points(setup, source: Path, tmp_path: Path, data_root: str) -> dict:
    out = tmp_path / "out"
    config = ["-c", str(TINY_CONFIG), "scratch.resolution=64", f"scratch.vocab={setup['vocab']}",
              f"scratch.data_root={data_root}"]
    loader = "from_pretrained" if source.is_dir() else "from_checkpoint"
    return {
        "rsam-predict": [str(SCRIPTS / "rsam-predict"), "--checkpoint", str(source), "--image", str(setup["image"]),
                         "--text", "the red ship", "--out", str(out / "predict"), "--device", "cpu"],
        "rsam-eval": [str(SCRIPTS / "rsam-eval"), "--checkpoint", str(source), "--num-gpus", "0",
                      "--out", str(out / "eval"), *(config if source.is_dir() else [])],
        "rsam-export": [str(SCRIPTS / "rsam-export"), "--checkpoint", str(source), "--out", str(out / "export")],
        "RSAMPredictor": [sys.executable, "-c", "import sys; from rsam.cli import run_command; from rsam import "
                          f"RSAMPredictor; sys.exit(run_command('api', lambda: RSAMPredictor.{loader}"
                          f"(sys.argv[1], device='cpu') and None))", str(source)],
        "checkpoint.init": [sys.executable, str(REPO / "training" / "train.py"), *config, "--num-gpus", "0",
                            "--log-dir", str(out / "train"), f"trainer.checkpoint.init=[{{path: '{source}'}}]"],
    }


@pytest.mark.parametrize("container", ["pretrained directory", "training checkpoint"])
def test_the_reproduction_is_refused_by_every_entry_point(setup, tmp_path, container, data_root):
    make = _hostile_dir if container == "pretrained directory" else _hostile_checkpoint
    source, marker = make(setup, tmp_path, "torch.load")
    file, key = _expected_words(source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, argv in _entry_points(setup, source, tmp_path, data_root).items():
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
        lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        assert not marker.exists(), f"{name} ran the pickle"
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert len(lines) == 1 and file in lines[0] and f"'{key}._target_'" in lines[0], (name, proc.stderr)
        assert "torch.load" in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------------------
# the library paths, every kind of hostile value


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("container", ["pretrained directory", "training checkpoint"])
def test_every_kind_is_refused_before_anything_is_built(setup, tmp_path, kind, container):
    make = _hostile_dir if container == "pretrained directory" else _hostile_checkpoint
    source, marker = make(setup, tmp_path, kind)
    file, key = _expected_words(source)
    from rsam.build import build_rsam, model_config

    model = build_rsam(model_config(setup["config"]))
    for attempt in (lambda: read_checkpoint(source), lambda: build_from_checkpoint(source, device="cpu"),
                    lambda: load_weights(model, source),
                    lambda: build_from_checkpoint(source, config=str(TINY_CONFIG), device="cpu",
                                                  overrides=["scratch.resolution=64"])):
        with pytest.raises(StoredConfigError) as info:
            attempt()
        assert file in str(info.value) and key in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_values_that_are_not_plain(tmp_path):
    for value, words in [(torch.zeros(2), "torch.Tensor value"), ("${oc.env:HOME}", "interpolation"),
                         ({1: 2}, "is not a string"), (b"x", "bytes value")]:
        with pytest.raises(StoredConfigError, match=words) as info:
            check_stored_config({"model": {"image_encoder": {"size": value}}}, "best.pt", "config")
        assert "best.pt: key 'config.model.image_encoder.size" in str(info.value)
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(StoredConfigError, match="nested deeper"):
        check_stored_config(deep, "config.json")


def test_old_files_still_load_and_build_the_same_model(setup):
    """Checkpoints and pretrained directories written so far (their _target_ names are ours) load unchanged."""
    a, cfg_a = build_from_checkpoint(setup["ckpt"], device="cpu")
    b, cfg_b = build_from_checkpoint(setup["dir"], device="cpu")
    assert read_checkpoint(setup["ckpt"]).kind == "training" and read_checkpoint(setup["dir"]).kind == "pretrained"
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        out_a = a(images, torch.tensor([0]), ids, torch.ones_like(ids, dtype=torch.bool))
        out_b = b(images, torch.tensor([0]), ids, torch.ones_like(ids, dtype=torch.bool))
    assert torch.equal(out_a.logits, out_b.logits)
    assert cfg_a["model"] == setup["config"]["model"]


def test_build_stored_calls_only_the_table(tmp_path):
    node = {"_target_": "rsam.data.transforms.EvalTransform", "resolution": 32}
    built = build_stored(node, "predictions.json", "dataset")
    assert type(built).__name__ == "EvalTransform"
    with pytest.raises(StoredConfigError, match="cannot be built here"):
        build_stored(node, "config.json", "model", allowed={"rsam.modeling.rsam.RSAM"})
    with pytest.raises(StoredConfigError, match=r"predictions.json: key 'dataset': cannot build .*EvalTransform"):
        build_stored({**node, "no_such_argument": 1}, "predictions.json", "dataset")


def test_a_fork_registers_its_own_builder():
    name = "fork.transforms.Identity"
    with pytest.raises(StoredConfigError, match="not one of RSAM's builders"):
        check_stored_config({"t": {"_target_": name}}, "best.pt")
    register_stored_builder(name, lambda **kw: ("built", kw))
    try:
        assert build_stored({"_target_": name, "x": 1}, "best.pt") == ("built", {"x": 1})
    finally:
        del STORED_BUILDERS[name]
