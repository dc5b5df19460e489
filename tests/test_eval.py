"""training/eval.py and the evaluation engine (rsam.evaluation) on a tiny random checkpoint and a synthetic split.

What is checked: 1 process and 2 processes (gloo) give identical metrics on a split of 5 images (a padded
DistributedSampler would score one image twice) and each process scores a disjoint share; metrics.json
records the convention; the loop's foreground rule is the convention's; original-resolution scoring uses the
ground truth decoded at the image's size; saved predictions re-score to the same metrics without the model;
--save-vis pictures; clear messages for an empty split, a missing split section and a mismatched checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rsam.data.synthetic import generate
from tiny_rsam_setup import REPO, TINY_CONFIG, make_checkpoint, tiny_config, write_vocab

EVAL_SCRIPT = REPO / "training" / "eval.py"
# One image per batch: every image is then computed the same way whatever the sharding, so the 1- and
# 2-process runs must agree bit for bit. In-image no-target records and drawn negatives are both on.
DATA_OVERRIDES = ["scratch.val_batch_size=1", "+data.test.dataset.empty_annotations=negative",
                  "scratch.eval_negative_ratio=0.5"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    root = tmp / "data"
    # 10 images: 5 train, 5 test (odd: 3 + 2 shards); 96 px files scored by a 64 px network.
    scenes = generate(str(root), 10, size=96, seed=3, neg_ratio=0.6, val_fraction=0.0, test_fraction=0.5)
    vocab = write_vocab(root / "vocab.txt", [w for s in scenes for d in s.descriptions for w in d.split()])
    config = tiny_config(["scratch.resolution=64", f"scratch.data_root={root}", f"scratch.vocab={vocab}",
                          *DATA_OVERRIDES])
    ckpt = make_checkpoint(tmp / "tiny.pt", config, object_bias=3.0)
    test = [s for s in scenes if s.split == "test"]
    return {"tmp": tmp, "root": root, "ckpt": ckpt, "config": config, "test": test}


def run_eval(setup, *extra, out=None):
    from training.eval import evaluate_cli

    out = out or str(setup["tmp"] / f"out_{abs(hash(extra))}")
    return evaluate_cli(["--checkpoint", str(setup["ckpt"]), "--num-gpus", "0", "--threads", "1", "--no-progress",
                 "--out", out, *extra])


def load_dataset(setup):
    from hydra.utils import instantiate

    return instantiate(setup["config"]["data"]["test"]["dataset"])


def test_one_and_two_processes_identical(setup):
    single = run_eval(setup, "--convention", "official", out=str(setup["tmp"] / "one"))
    out2 = setup["tmp"] / "two"
    env = dict(os.environ, PYTHONPATH="")  # the installed package, nothing else
    proc = subprocess.run(
        [sys.executable, str(EVAL_SCRIPT), "--checkpoint", str(setup["ckpt"]), "--num-gpus", "0", "--num-procs",
         "2", "--threads", "1", "--no-progress", "--convention", "official", "--out", str(out2)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    double = json.loads((out2 / "metrics.json").read_text())

    assert double["num_processes"] == 2 and single["num_processes"] == 1
    assert double["metrics"] == single["metrics"]  # exact, every key
    m = single["metrics"]
    # every expression once: the test images' records (positives + in-image no-target) + drawn negatives
    dataset = load_dataset(setup)
    expected = sum(dataset[i].num_expressions for i in range(len(dataset)))
    assert m["num_expressions"] == expected
    assert sorted(double["expressions_per_process"]) != [0, expected]
    assert sum(double["expressions_per_process"]) == expected  # disjoint shares, no padding duplicates
    assert m["num_no_target"] > 0 and m["num_negative"] > 0 and 0 < m["mIoU"] < 1
    # the printed/recorded convention
    assert single["convention"] == "official" and "logit >= 0.5" in single["convention_description"]
    assert "Pr@X counts IoU > X" in single["convention_description"]
    on_disk = json.loads((setup["tmp"] / "one" / "metrics.json").read_text())
    assert on_disk["metrics"] == m and on_disk["split"] == "test" and on_disk["resolution"] == "network"


def test_ranks_leave_the_group_together_after_rank_0_wrote(setup, monkeypatch):
    """The end of a rank's run is ordered: results written (rank 0), a barrier, then the group torn down.

    A rank leaving while rank 0 still wrote once aborted that rank on exit (gloo), failing a finished run.
    """
    import training.eval as eval_script
    from rsam import distributed as D

    events = []
    report = eval_script._report
    monkeypatch.setattr(eval_script, "_report", lambda *a: events.append("report") or report(*a))
    monkeypatch.setattr(D, "barrier", lambda: events.append("barrier"))
    destroy = D.destroy_distributed
    monkeypatch.setattr(D, "destroy_distributed", lambda: events.append("destroy") or destroy())
    record = run_eval(setup, out=str(setup["tmp"] / "ordered"))
    assert record is not None and events == ["report", "barrier", "destroy"]


def _loader(setup, original: bool):
    from hydra.utils import instantiate

    from rsam.data.loaders import build_eval_loader
    from rsam.evaluation.inputs import EvalCollator, EvalDataset

    collate = instantiate(setup["config"]["data"]["test"]["collate"])
    return build_eval_loader(EvalDataset(load_dataset(setup), original_masks=original), EvalCollator(collate),
                             batch_size=2, num_workers=0, rank=0, world_size=1)


@pytest.fixture(scope="module")
def model(setup):
    from rsam.build import build_from_checkpoint

    return build_from_checkpoint(setup["ckpt"], device="cpu")[0]


def test_convention_decides_foreground(setup, model):
    """The loop thresholds like the convention says, and the metrics are those of the scored expressions."""
    from rsam.evaluation import evaluate

    for name in ("standard", "official"):
        seen = []
        result = evaluate(model, _loader(setup, False), name, progress=False, callbacks=[seen.append])
        assert result.convention.name == name
        assert len(seen) == result.metrics["num_expressions"] == result.local_expressions
        ious = [e.iou for e in seen]
        assert result.metrics["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-12)
        first = seen[0]
        batch, extras = next(iter(_loader(setup, False)))
        with torch.no_grad():
            out = model(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
        assert torch.equal(first.image, batch.images[batch.expr_to_image[0]])
        logits = out.logits[0, 0]
        assert torch.equal(first.pred, logits > 0 if name == "standard" else logits >= 0.5)
        assert first.text == extras.texts[0] and first.sample_id == tuple(batch.sample_ids[0])
    # a loader of plain Batch objects (the trainer's) gives the same numbers
    from hydra.utils import instantiate

    from rsam.data.loaders import build_eval_loader

    plain = build_eval_loader(load_dataset(setup), instantiate(setup["config"]["data"]["test"]["collate"]),
                              batch_size=2, num_workers=0, rank=0, world_size=1)
    assert evaluate(model, plain, "official", progress=False).metrics == result.metrics


def test_original_resolution(setup, model):
    from rsam.evaluation import evaluate

    seen = []
    result = evaluate(model, _loader(setup, True), "standard", resolution="original", progress=False,
                      callbacks=[seen.append])
    network = evaluate(model, _loader(setup, False), "standard", progress=False)
    assert result.metrics["num_expressions"] == network.metrics["num_expressions"]
    assert result.metrics["mIoU"] != network.metrics["mIoU"]  # scored on other pixels
    for e in seen:
        assert e.pred.shape == e.gt.shape == (96, 96)
        name, aid = e.sample_id
        ann = json.loads((setup["root"] / "Annotations" / f"{name}.json").read_text())["annotations"]
        if aid < 0 or ann[aid]["area"] <= 0:
            assert not e.gt.any()
        else:
            rle = dict(ann[aid]["segmentation"], counts=ann[aid]["segmentation"]["counts"].encode())
            assert np.array_equal(e.gt.numpy(), mask_utils.decode(rle).astype(bool))
    with pytest.raises(ValueError, match="original_masks=True"):
        evaluate(model, _loader(setup, False), resolution="original", progress=False)


@pytest.mark.parametrize("resolution", ["network", "original"])
def test_save_predictions_and_rescore(setup, resolution):
    from training.eval import evaluate_cli

    pred_dir = setup["tmp"] / f"pred_{resolution}"
    out = str(setup["tmp"] / f"vis_{resolution}")
    record = run_eval(setup, "--convention", "standard", "--resolution", resolution, "--save-predictions",
                      str(pred_dir), "--save-vis", "2", out=out)
    saved = json.loads((pred_dir / "predictions.json").read_text())
    preds = saved["predictions"]
    assert len(preds) == record["metrics"]["num_expressions"]
    size = 64 if resolution == "network" else 96
    for p in preds[:3]:
        mask = np.asarray(Image.open(pred_dir / p["mask"]))
        assert mask.shape == (size, size) and set(np.unique(mask)) <= {0, 255}
        assert {"iou_pred", "object_score", "no_target", "expression", "image", "annotation_id"} <= set(p)
        assert isinstance(p["expression"], str) and p["expression"]
    vis = sorted(os.listdir(os.path.join(out, "vis")))
    assert len(vis) == 4 and sum(f.endswith("_errors.png") for f in vis) == 2
    Image.open(os.path.join(out, "vis", vis[0])).load()

    rescored = evaluate_cli(["--rescore", str(pred_dir)])
    assert rescored["metrics"] == record["metrics"]
    assert json.loads((pred_dir / "metrics_rescored.json").read_text())["metrics"] == record["metrics"]


def _expect_exit(capsys, argv, *fragments):
    from training.eval import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err


def test_clear_errors(setup, capsys, tmp_path):
    base = ["--checkpoint", str(setup["ckpt"]), "--num-gpus", "0", "--no-progress", "--out", str(tmp_path)]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _expect_exit(capsys, base + [f"+data.test.dataset.reader_options.file_list={empty}"], "empty.txt: split list is empty")
    _expect_exit(capsys, base + ["--split", "val"], "RISORS_val.txt: split list is empty")  # 0 val images
    _expect_exit(capsys, base + ["--split", "nosuch"], "no data.nosuch section")
    _expect_exit(capsys, base + ["-c", str(TINY_CONFIG), "scratch.resolution=64", "model.mlp_dim=128"],
                 "does not fit the model", "model.mlp_dim: checkpoint 256, config 128")
    _expect_exit(capsys, ["--rescore", str(tmp_path)], "predictions.json not found")


def test_evaluator_reuses_its_loader_and_matches_the_loop(setup, model):
    """The trainer's path: one Evaluator per split, run after run on the same loader, same numbers as evaluate()."""
    from hydra.utils import instantiate

    from rsam.evaluation import Evaluator, evaluate

    evaluator = Evaluator(load_dataset(setup), instantiate(setup["config"]["data"]["test"]["collate"]),
                          batch_size=2, convention="standard", progress=False, name="test")
    loader = evaluator.loader
    first, second = evaluator.run(model), evaluator.run(model)
    assert evaluator.loader is loader and first.metrics == second.metrics
    assert first.metrics == evaluate(model, _loader(setup, False), "standard", progress=False).metrics


def test_cli_exit_status(setup, tmp_path):
    """`python training/eval.py` (and the installed rsam-eval) exit 0 on success, 2 on bad input."""
    base = [sys.executable, str(EVAL_SCRIPT), "--checkpoint", str(setup["ckpt"]), "--num-gpus", "0", "--threads",
            "1", "--no-progress", "--out", str(tmp_path / "ok")]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "ok" / "metrics.json").is_file()
    bad = subprocess.run(base + ["--split", "nosuch"], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert bad.returncode == 2 and "no data.nosuch section" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("fmt", ["rrsisd", "refsegrs", "jsonl"])
def test_eval_reads_every_format_with_the_same_result(setup, fmt):
    """The same draw written as another release format: read by training/eval.py through the config's format."""
    root = setup["tmp"] / f"data_{fmt}"
    if not root.exists():
        generate(str(root), 10, size=96, seed=3, neg_ratio=0.6, val_fraction=0.0, test_fraction=0.5, format=fmt)
    plain = ["data.test.dataset.empty_annotations=skip", "data.test.dataset.negative_ratio=0.0"]
    reference = run_eval(setup, *plain)["metrics"]
    other = run_eval(setup, *plain, f"data.test.dataset.format={fmt}", f"data.test.dataset.root={root}")["metrics"]
    if fmt == "refsegrs":  # lossless TIFF pixels instead of the JPEG copy, other scores; no-target records kept
        assert other["num_expressions"] > reference["num_expressions"] and 0 <= other["mIoU"] <= 1  # (empty masks)
        return
    # jsonl keeps its explicit no-target lines ("mask": null): its positives are the RISORS expressions
    prefix = "pos/" if fmt == "jsonl" else ""
    assert fmt != "jsonl" or other["num_expressions"] > reference["num_expressions"]
    for key in ("mIoU", "oIoU", "Pr@0.5"):
        assert other[prefix + key] == pytest.approx(reference[key], abs=1e-9), key
