"""Pretrained directories (rsam.pretrained) on a tiny random checkpoint: no network anywhere.

What is checked: save -> load gives bit-identical outputs (RSAMPredictor and rsam.load_pretrained), the
directory holds exactly config.json, model.safetensors, vocab.txt and a model card with Hub front matter, and
no pickle; the vocabulary is the directory's own; a Hugging Face cache laid out as huggingface_hub lays it
out (models--user--name/{blobs, refs/main, snapshots/<commit>}) loads by repo id with HF_HUB_OFFLINE=1, in a
fresh process whose only route to the Hub is a dead endpoint (rsam-predict --checkpoint <repo id> too);
push_to_hub calls HfApi.create_repo and upload_folder with the four files (HfApi monkeypatched); bad
directories fail with messages naming the file and field; build_from_checkpoint and training/eval.py take a
pretrained directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import rsam
from rsam.build import ConfigMismatchError, build_from_checkpoint
from rsam.predictor import RSAMPredictor
from rsam.pretrained import (CARD_NAME, CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, PretrainedError, is_pretrained_dir,
                             load_pretrained, looks_like_repo_id, push_to_hub, read_pretrained, save_pretrained)
from tiny_rsam_setup import REPO, tiny_checkpoint

TEXTS = ["the red ship", "the largest white building at the top left"]
FILES = {CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME, CARD_NAME}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrained")
    vocab, config, ckpt = tiny_checkpoint(tmp)
    predictor = RSAMPredictor.from_checkpoint(ckpt, device="cpu")
    directory = predictor.save_pretrained(tmp / "rsam-tiny", metrics={"mIoU": 0.5123, "oIoU": 0.6},
                                          card={"name": "RSAM tiny", "data": "Synthetic scenes."})
    image = np.random.default_rng(0).integers(0, 256, size=(45, 75, 3), dtype=np.uint8)
    predictor.set_image(image)
    reference = predictor.predict(TEXTS)
    return {"tmp": tmp, "vocab": vocab, "config": config, "ckpt": ckpt, "dir": Path(directory), "image": image,
            "reference": reference}


def _same(preds, reference) -> None:
    assert [p.text for p in preds] == [r.text for r in reference]
    for p, r in zip(preds, reference):
        assert torch.equal(p.logits, r.logits) and torch.equal(p.mask, r.mask)
        assert p.iou_pred == r.iou_pred and p.object_score == r.object_score


def test_round_trip_equal_outputs(setup):
    loaded = RSAMPredictor.from_pretrained(setup["dir"], device="cpu")
    loaded.set_image(setup["image"])
    _same(loaded.predict(TEXTS), setup["reference"])
    model, cfg = rsam.load_pretrained(str(setup["dir"]), device="cpu")
    original = torch.load(setup["ckpt"], weights_only=True)["model"]
    assert set(model.state_dict()) == set(original)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert not model.training and cfg["model"] == setup["config"]["model"]
    # the predictor's own save_pretrained of a loaded directory writes the same weights again
    again = loaded.save_pretrained(setup["tmp"] / "again")
    a, b = read_pretrained(again).state_dict, read_pretrained(setup["dir"]).state_dict
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_directory_layout_no_pickle_and_card(setup):
    d = setup["dir"]
    assert {p.name for p in d.iterdir()} == FILES
    for p in d.iterdir():
        head = p.read_bytes()[:8]
        assert not head.startswith(b"PK") and head[:1] != b"\x80", f"{p.name} looks like a torch/pickle file"
    raw = (d / WEIGHTS_NAME).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert header["__metadata__"]["format"] == "pt" and "text_proj.weight" in header
    record = json.loads((d / CONFIG_NAME).read_text())
    assert record["rsam_format"] == 1 and record["model"]["_target_"] == "rsam.modeling.rsam.RSAM"
    assert record["tokenizer"]["vocab"] == VOCAB_NAME and record["tokenizer"]["mode"] == "standard"
    assert record["info"]["metrics"] == {"mIoU": 0.5123, "oIoU": 0.6}
    assert (d / VOCAB_NAME).read_bytes() == setup["vocab"].read_bytes()
    card = (d / CARD_NAME).read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "rsam" and front["license"] == "apache-2.0"
    assert {"rsam", "remote-sensing", "referring-image-segmentation"} <= set(front["tags"])
    for text in ("# RSAM tiny", "| mIoU | 51.23 % |", "Synthetic scenes.", "## Recipe", "network resolution | 64 px",
                 "## Licence", "from_pretrained"):
        assert text in card, text


def test_vocab_is_the_directorys_own(setup, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(setup["dir"], moved)
    loaded = RSAMPredictor.from_pretrained(moved, device="cpu")
    assert Path(loaded.tokenizer.vocab_path) == (moved / VOCAB_NAME).resolve()
    loaded.set_image(setup["image"])
    _same(loaded.predict(TEXTS), setup["reference"])


def _fill_hf_cache(cache: Path, repo_id: str, directory: Path, commit: str) -> Path:
    """The layout huggingface_hub writes: blobs named by content hash, refs/main = commit, snapshot symlinks."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    for f in sorted(directory.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, storage / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


OFFLINE_SCRIPT = r"""
import json, sys
import numpy as np
from rsam.predictor import RSAMPredictor
image = np.random.default_rng(0).integers(0, 256, size=(45, 75, 3), dtype=np.uint8)
out = {}
p = RSAMPredictor.from_pretrained(sys.argv[1], revision=sys.argv[2] if len(sys.argv) > 2 else None, device="cpu")
p.set_image(image)
out["logits"] = [r.logits.double().sum().item() for r in p.predict(%r)]
out["vocab"] = p.tokenizer.vocab_path
try:
    RSAMPredictor.from_pretrained("user/not-cached", device="cpu")
except FileNotFoundError as exc:
    out["missing"] = str(exc)
from PIL import Image
from rsam.tools.predict import main
Image.fromarray(image).save("scene.png")
out["cli"] = main(["--checkpoint", sys.argv[1], "--image", "scene.png", "--text", "the red ship", "--out", "cli",
                   "--device", "cpu", "--quiet"] + (["--revision", sys.argv[2]] if len(sys.argv) > 2 else []))
out["cli_missing"] = main(["--checkpoint", "user/not-cached", "--image", "scene.png", "--text", "x", "--out", "c2"])
print(json.dumps(out))
""" % (TEXTS,)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_offline_hf_cache_by_repo_id(setup, tmp_path, variable):
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache_root = tmp_path / "hf"
    cache = cache_root / "hub" if variable == "HF_HOME" else cache_root
    snapshot = _fill_hf_cache(cache, "user/rsam-tiny", setup["dir"], commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update({variable: str(cache_root), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
                "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "*", "PYTHONPATH": str(REPO)})
    args = [sys.executable, "-c", OFFLINE_SCRIPT, "user/rsam-tiny"] + ([commit] if variable == "HF_HOME" else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["logits"] == [r.logits.double().sum().item() for r in setup["reference"]]
    assert Path(out["vocab"]).resolve() == (snapshot / VOCAB_NAME).resolve()
    assert "user/not-cached" in out["missing"] and "not in the local HF cache" in out["missing"]
    assert out["cli"] == 0 and out["cli_missing"] == 2  # rsam-predict --checkpoint <repo id>, offline
    assert "not in the local HF cache" in proc.stderr and "Traceback" not in proc.stderr
    line = json.loads((tmp_path / "cli" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["area_px"] == int(setup["reference"][0].mask.sum())


def test_repo_id_rules(setup):
    assert looks_like_repo_id("user/rsam-b-plus") and looks_like_repo_id("org.x/model_1.0")
    assert not looks_like_repo_id("best.pt") and not looks_like_repo_id("runs/exp/best.pt")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("rsam-b-plus")  # no namespace: a path
    assert not looks_like_repo_id(str(setup["dir"]))  # an existing directory is a directory
    with pytest.raises(FileNotFoundError, match="no such directory, and not a Hub repo id"):
        load_pretrained("nowhere/at/all")
    with pytest.raises(PretrainedError, match="is a file, not a pretrained directory"):
        load_pretrained(setup["ckpt"])
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repo ids only"):
        load_pretrained(setup["dir"], revision="v1")


def test_push_to_hub_uploads_the_four_files(setup, monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        present = sorted(p.name for p in Path(folder_path).iterdir())
        sizes = {name: (Path(folder_path) / name).stat().st_size for name in present}
        calls.append(("upload_folder", repo_id, {"files": present, "sizes": sizes, **kwargs}))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert push_to_hub(setup["dir"], "user/rsam-tiny", private=True) == "commit-info"
    (name1, repo1, kw1), (name2, repo2, kw2) = calls
    assert (name1, repo1, kw1["private"], kw1["exist_ok"]) == ("create_repo", "user/rsam-tiny", True, True)
    assert name2 == "upload_folder" and repo2 == "user/rsam-tiny" and kw2["repo_type"] == "model"
    assert sorted(kw2["allow_patterns"]) == sorted(FILES) and set(kw2["files"]) >= FILES
    assert kw2["sizes"][WEIGHTS_NAME] == (setup["dir"] / WEIGHTS_NAME).stat().st_size

    calls.clear()  # a predictor or a model is saved to a temporary directory first
    predictor = RSAMPredictor.from_checkpoint(setup["ckpt"], device="cpu")
    push_to_hub(predictor, "user/rsam-tiny-2")
    push_to_hub(predictor.model, "user/rsam-tiny-3", config=setup["config"])
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert [u[1] for u in uploads] == ["user/rsam-tiny-2", "user/rsam-tiny-3"]
    assert all(set(u[2]["files"]) == FILES for u in uploads)
    with pytest.raises(ValueError, match="needs config="):
        push_to_hub(predictor.model, "user/x")
    broken = setup["tmp"] / "broken_push"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        push_to_hub(broken, "user/x")
    assert len([c for c in calls if c[0] == "upload_folder"]) == 2  # nothing uploaded for the bad calls


def _copy(setup, tmp_path, name="bad") -> Path:
    d = tmp_path / name
    shutil.copytree(setup["dir"], d)
    return d


def _edit_config(d: Path, edit) -> None:
    record = json.loads((d / CONFIG_NAME).read_text())
    edit(record)
    (d / CONFIG_NAME).write_text(json.dumps(record))


def test_bad_directories_name_the_file(setup, tmp_path):
    d = _copy(setup, tmp_path, "no_weights")
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no_weights/model\.safetensors not found"):
        load_pretrained(d, device="cpu")
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only \\(no pickle\\)"):
        load_pretrained(d, device="cpu")

    d = _copy(setup, tmp_path, "mismatch")
    _edit_config(d, lambda r: r["model"]["text_encoder"].update(hidden_size=32))
    with pytest.raises(ConfigMismatchError) as err:
        load_pretrained(d, device="cpu")
    msg = str(err.value)
    assert f"{d / WEIGHTS_NAME} does not fit the model of the config stored in {d / CONFIG_NAME}" in msg
    assert "text_encoder.embeddings.word_embeddings.weight: model expects (30522, 32)" in msg

    d = _copy(setup, tmp_path, "bad_json")
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(PretrainedError, match=r"bad_json/config\.json: not valid JSON"):
        load_pretrained(d, device="cpu")
    d = _copy(setup, tmp_path, "no_model")
    _edit_config(d, lambda r: r.pop("model"))
    with pytest.raises(PretrainedError, match=r"no_model/config\.json: field 'model' must be an object"):
        load_pretrained(d, device="cpu")
    d = _copy(setup, tmp_path, "future")
    _edit_config(d, lambda r: r.update(rsam_format=99))
    with pytest.raises(PretrainedError, match="field 'rsam_format' is 99"):
        load_pretrained(d, device="cpu")
    d = _copy(setup, tmp_path, "no_vocab")
    (d / VOCAB_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no_vocab/vocab\.txt not found \(field 'tokenizer.vocab'"):
        load_pretrained(d, device="cpu")
    d = _copy(setup, tmp_path, "junk_weights")
    (d / WEIGHTS_NAME).write_bytes(b"junk")
    with pytest.raises(PretrainedError, match=r"junk_weights/model\.safetensors: not a readable safetensors"):
        load_pretrained(d, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json not found"):
        build_from_checkpoint(empty, device="cpu")


def test_build_from_checkpoint_takes_a_directory_not_a_bert_one(setup, tmp_path):
    model, cfg = build_from_checkpoint(setup["dir"], device="cpu")
    assert cfg["tokenizer"]["vocab"] == str((setup["dir"] / VOCAB_NAME).resolve())
    assert is_pretrained_dir(setup["dir"]) and not is_pretrained_dir(setup["ckpt"])
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / CONFIG_NAME).write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    assert not is_pretrained_dir(bert)  # HF BERT directories still go to rsam.checkpoint's reader
    # save_pretrained refuses what it cannot make self-contained
    with pytest.raises(PretrainedError, match="no `model` node"):
        save_pretrained(model, {"tokenizer": cfg["tokenizer"]}, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="vocabulary file .*missing.txt not found"):
        save_pretrained(model, {**cfg, "tokenizer": {"vocab": str(tmp_path / "missing.txt")}}, tmp_path / "y")


def test_eval_script_on_a_pretrained_directory(setup, tmp_path):
    """training/eval.py --checkpoint DIR -c CONFIG: the same metrics as on the checkpoint file."""
    from rsam.data.synthetic import generate
    from training.eval import evaluate_cli

    root = tmp_path / "data"
    generate(str(root), 6, size=80, seed=5, val_fraction=0.0, test_fraction=0.5)
    overrides = ["scratch.resolution=64", f"scratch.data_root={root}", f"scratch.vocab={setup['vocab']}",
                 "scratch.val_batch_size=2"]
    config = str(REPO / "configs" / "rsam_tiny_cpu.yaml")
    common = ["--num-gpus", "0", "--threads", "1", "--no-progress", "--convention", "standard"]
    from_file = evaluate_cli(["--checkpoint", str(setup["ckpt"]), "-c", config, *common,
                              "--out", str(tmp_path / "file"), *overrides])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "training" / "eval.py"), "--checkpoint", str(setup["dir"]),
                           "-c", config, *common, "--out", str(tmp_path / "dir"), *overrides],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from_dir = json.loads((tmp_path / "dir" / "metrics.json").read_text())
    assert from_dir["metrics"] == from_file["metrics"] and from_dir["metrics"]["num_expressions"] > 0
    # without -c there is no data section: one clear line, exit status 2
    proc = subprocess.run([sys.executable, str(REPO / "training" / "eval.py"), "--checkpoint", str(setup["dir"]),
                           *common], capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 2 and "is a pretrained directory" in proc.stderr and "Traceback" not in proc.stderr
