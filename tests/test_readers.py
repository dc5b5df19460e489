"""Every dataset format through its reader: the same expressions and masks as drawn, the release defects, bad
input named by file and field, hostile pickles, ``rsam-data check`` / ``convert``, mixed datasets, leakage."""
from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from rsam.data.dataset import ReferringDataset
from rsam.data.errors import DataError
from rsam.data.leakage import LeakageError, find_leaks, image_files, report_leaks
from rsam.data.mixed import MixedDataset
from rsam.data.readers import open_reader
from rsam.data.readers.base import category_from_text
from rsam.data.safe_pickle import PickleRefused
from rsam.data.synthetic import generate
from rsam.evaluation.metrics import combine_metrics
from rsam.tools import data as data_cli

N, SIZE, SEED = 8, 64, 3
FORMATS = ("risors", "rrsisd", "refsegrs", "risbench", "jsonl")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSAM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same draw written in every format."""
    base = tmp_path_factory.mktemp("formats")
    return {fmt: (str(base / fmt), generate(str(base / fmt), N, SIZE, SEED, format=fmt)) for fmt in FORMATS}


def _expressions(fmt: str, root: str, split: str):
    """{(text, mask bytes)} of a split at the original size: what a reader makes of the files."""
    ds = ReferringDataset(root, split, training=False, resolution=SIZE, format=fmt)
    out = set()
    for i in range(len(ds)):
        original = ds.read_original(i)
        for text, mask in zip(original["descriptions"], original["masks"]):
            out.add((text.lower(), mask.tobytes()))
    return out


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_every_format_reads_the_same_expressions_and_masks(written, fmt):
    root, scenes = written[fmt]
    risors_root, _ = written["risors"]
    for split in ("train", "val", "test"):
        expected = _expressions("risors", risors_root, split)
        assert expected and _expressions(fmt, root, split) == expected


def test_training_samples_of_every_format_have_the_network_shape(written):
    for fmt in FORMATS:
        root, _ = written[fmt]
        ds = ReferringDataset(root, "train", training=True, resolution=32, format=fmt, negative_ratio=1.0)
        sample = ds[(0, 0)]
        assert sample.image.shape == (3, 32, 32) and sample.masks.shape[1:] == (32, 32)
        assert len(sample.descriptions) == sample.masks.shape[0] >= 1


def test_rrsisd_defects_resize_masks_and_are_reported(tmp_path, caplog):
    root = str(tmp_path / "d")
    generate(root, 4, SIZE, SEED, format="rrsisd", defects=True)
    with caplog.at_level(logging.WARNING, logger="rsam.data.readers.base"):
        ds = ReferringDataset(root, "train", training=False, resolution=SIZE, format="rrsisd")
        small = [i for i in range(len(ds)) if ds.read_original(i)["image"].shape[:2] != (SIZE, SIZE)]
    assert small, "the defects option must write smaller JPEGs"
    original = ds.read_original(small[0])
    assert original["masks"].shape[1:] == original["image"].shape[:2]  # resized to the image
    assert "resized to the image size" in caplog.text
    report = data_cli.scan("rrsisd", root)
    resized = [p for p in report.problems if p["kind"] == "mask_resized"]
    assert resized and report.errors == 0 and report.exit_status() == 0


def test_refer_polygons_and_shared_text_union(tmp_path):
    root = str(tmp_path / "nwpu")
    generate(root, 6, SIZE, SEED, format="rrsisd", polygons=True, shared_text_refs=2, refer_prefix="new_",
             refer_name="nwpu")
    separate = open_reader("rrsisd", root, "train", dataset_name="nwpu", prefix="new_")
    union = open_reader("rrsisd", root, "train", dataset_name="nwpu", prefix="new_", shared_text="union")
    merged = 0
    for name in union.names:
        a = separate.load_annotations(name)
        b = union.load_annotations(name)
        texts = [x.description.lower() for x in a]
        if len(set(texts)) < len(texts):
            merged += 1
            assert len(b) == len(set(texts))
            shared = next(t for t in texts if texts.count(t) > 1)
            parts = [x for x in a if x.description.lower() == shared]
            size = union.image_sizes[name]
            union_mask = union.decode_masks(name, [x for x in b if x.description.lower() == shared], size)[0]
            expected = np.logical_or.reduce(separate.decode_masks(name, parts, size))
            assert np.array_equal(union_mask, expected)
    assert merged >= 1


def test_hostile_pickle_is_refused_without_running(tmp_path, written):
    import shutil

    root = tmp_path / "hostile"
    shutil.copytree(written["rrsisd"][0], root)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "rrsisd" / "refs(unc).p").write_bytes(pickle.dumps([Payload()], protocol=2))
    with pytest.raises(PickleRefused, match=r"refs\(unc\)\.p: refused to unpickle: .*'posix\.system'"):
        ReferringDataset(str(root), "train", format="rrsisd")
    assert data_cli.main(["check", "--format", "rrsisd", str(root), "--json"]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("fmt, corrupt, message", [
    ("refsegrs", lambda r: (r / "output_phrase_train.txt").write_text("00000\n", encoding="utf-8"),
     r"output_phrase_train\.txt: line 1: expected '<key> <expression>'"),
    ("risbench", lambda r: (r / "output_phrase_train.txt").write_bytes(b"a.png caf\xe9\n"),
     r"output_phrase_train\.txt: line 1 is not UTF-8"),
    ("jsonl", lambda r: (r / "manifest.jsonl").write_text('{"image": "x.jpg", "split": "train"}\n'),
     r"manifest\.jsonl: line 1\.text must be a str"),
])
def test_bad_lines_name_the_file_and_the_line(tmp_path, written, fmt, corrupt, message):
    import shutil

    root = tmp_path / fmt
    shutil.copytree(written[fmt][0], root)
    corrupt(root)
    with pytest.raises(DataError, match=message):
        ReferringDataset(str(root), "train", format=fmt)


def test_unknown_split_lists_the_splits(written):
    for fmt in ("rrsisd", "refsegrs", "jsonl"):
        with pytest.raises(DataError, match=r"splits .*test.*train.*val"):
            ReferringDataset(written[fmt][0], "testA", format=fmt)


def test_skip_bad_samples_counts_a_bad_line_and_keeps_the_rest(tmp_path, written):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["refsegrs"][0], root)
    lines = (root / "output_phrase_train.txt").read_text().splitlines()
    (root / "output_phrase_train.txt").write_text("\n".join(lines + ["99999"]) + "\n")
    ds = ReferringDataset(str(root), "train", format="refsegrs", skip_bad_samples=True)
    assert len(ds) == len(lines) and ds.bad_sample_counts()["description"] == 1


def test_mask_of_another_size_is_an_error_outside_rrsisd(tmp_path, written):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["risbench"][0], root)
    name = sorted(os.listdir(root / "mask"))[0]
    Image.new("L", (SIZE - 4, SIZE)).save(root / "mask" / name)
    with pytest.raises(DataError, match=rf"mask/{name}: expression 0: mask size \[{SIZE}, {SIZE - 4}\] != image size"):
        ds = ReferringDataset(str(root), "train", training=False, format="risbench")
        ds.read_original(ds.names.index(name))
    report = data_cli.scan("risbench", str(root))
    assert report.exit_status() == 1 and [p["kind"] for p in report.problems] == ["size_mismatch"]


def test_check_json_is_exactly_the_documented_object(written, capsys):
    root = written["jsonl"][0]
    vocab = os.path.join(root, "vocab.txt")
    assert data_cli.main(["check", "--format", "jsonl", root, "--json", "--vocab", vocab, "--max-tokens", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"format", "root", "splits", "problems", "errors", "warnings"}
    assert set(out["splits"]) == {"train", "val", "test"}
    assert all(set(v) == {"images", "expressions", "no_target"} for v in out["splits"].values())
    assert out["errors"] == 0 and out["warnings"] == len(out["problems"]) > 0
    assert {p["kind"] for p in out["problems"]} == {"text_too_long"}
    assert all(set(p) == {"kind", "path", "detail"} for p in out["problems"])
    assert data_cli.main(["check", "--format", "rrsisd", root, "--json"]) == 2  # wrong layout


def test_convert_round_trips_to_jsonl(tmp_path, written):
    root, _ = written["rrsisd"]
    out = tmp_path / "converted"
    assert data_cli.main(["convert", "--format", "rrsisd", root, "--out", str(out)]) == 0
    for split in ("train", "val", "test"):
        assert _expressions("jsonl", str(out), split) == _expressions("rrsisd", root, split)
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert os.path.isabs(line["image"]) and line["source"]["dataset"] == "rrsisd"


def test_category_heuristic_takes_the_first_name_in_the_text():
    names = ("road", "road marking", "car", "low vegetation")
    assert category_from_text("the road marking next to the car", names) == "road marking"
    assert category_from_text("two cars on the road", names) == "car"
    assert category_from_text("the roadside tree", names) is None


def test_mixed_dataset_follows_the_weights_and_is_deterministic(written):
    a = ReferringDataset(written["risors"][0], "train", training=True, resolution=32)
    b = ReferringDataset(written["jsonl"][0], "train", training=True, resolution=32, format="jsonl")
    mixed = MixedDataset({"a": a, "b": b}, weights={"a": 3.0, "b": 1.0}, epoch_size=20, seed=1)
    assert mixed.shares() == {"a": 15, "b": 5} and len(mixed) == 20
    plan = mixed.plan(0)
    assert [k for k, _ in plan].count(0) == 15
    counts = np.bincount([j for k, j in plan if k == 0], minlength=len(a))
    assert counts.max() - counts.min() <= 1  # successive permutations: every image before any repeats
    assert MixedDataset({"a": a, "b": b}, {"a": 3.0, "b": 1.0}, 20, seed=1).plan(0) == plan
    assert mixed.plan(1) != plan
    assert mixed[(0, 0)].image.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown datasets"):
        MixedDataset({"a": a}, weights={"c": 1.0})


def test_combined_metrics_are_per_dataset_and_their_mean():
    out = combine_metrics({"a": {"mIoU": 0.5, "num_expressions": 10}, "b": {"mIoU": 0.7, "num_expressions": 4}})
    assert out["a/mIoU"] == 0.5 and out["b/mIoU"] == 0.7
    assert out["mIoU"] == pytest.approx(0.6) and out["num_expressions"] == 14


def test_leakage_guard_finds_copies_by_content(tmp_path, written, caplog):
    import shutil

    train = ReferringDataset(written["risors"][0], "train", training=False)
    other = tmp_path / "other"
    shutil.copytree(written["jsonl"][0], other)
    manifest = [json.loads(x) for x in (other / "manifest.jsonl").read_text().splitlines()]
    first_train = next(m["image"] for m in manifest if m["split"] == "train")
    for m in manifest:  # one training image (same pixels, same bytes) also becomes a val image
        if m["image"] == first_train:
            m["split"] = "val"
    (other / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    val = ReferringDataset(str(other), "val", training=False, format="jsonl")
    leaks = find_leaks(image_files(train), image_files(val))
    assert len(leaks) == 1 and leaks[0][1].endswith(first_train)
    with caplog.at_level(logging.WARNING):
        assert report_leaks(train, {"val": val}, strict=False, logger=logging.getLogger("t")) == 1
    assert "1 training image(s) also appear" in caplog.text
    with pytest.raises(LeakageError, match="strict_leakage"):
        report_leaks(train, {"val": val}, strict=True, logger=logging.getLogger("t"))
    clean = ReferringDataset(written["risors"][0], "val", training=False)
    assert report_leaks(train, {"val": clean}, strict=True, logger=logging.getLogger("t")) == 0


def test_check_reports_each_problem_once_and_keeps_scanning(tmp_path, written):
    import shutil

    root = tmp_path / "j"
    shutil.copytree(written["jsonl"][0], root)
    with open(root / "manifest.jsonl", "ab") as f:
        f.write(b"{not json\n")
        f.write(b'{"image": "x.jpg", "split": "val", "text": "caf\xe9"}\n')  # not UTF-8: this line only
    report = data_cli.scan("jsonl", str(root))
    kinds = sorted(p["kind"] for p in report.problems)
    assert kinds == ["empty_text", "malformed_record"], report.problems  # once, not once per split
    assert set(report.splits) == {"train", "val", "test"} and report.exit_status() == 1


def test_check_decodes_pixels_and_flags_an_empty_dataset(tmp_path, written):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["risors"][0], root)
    image = sorted((root / "JPEGImages").iterdir())[0]
    image.write_bytes(image.read_bytes()[:700])  # truncated JPEG: the header still opens
    report = data_cli.scan("risors", str(root))
    assert [p["kind"] for p in report.problems] == ["unreadable_file"] and report.exit_status() == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.jsonl").write_text("")
    assert data_cli.main(["check", "--format", "jsonl", str(tmp_path / "empty"), "--json"]) != 0


def test_refer_bad_ref_fields_are_reported_not_dropped(tmp_path, written):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["rrsisd"][0], root)
    refs_file = root / "rrsisd" / "refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    del refs[0]["split"]
    refs[1]["split"] = None
    refs[2]["sentences"].append({"raw": "", "sent": "", "sent_id": 999})
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    report = data_cli.scan("rrsisd", str(root))
    details = [p["detail"] for p in report.problems]
    assert any("refs[0] has no ['split']" in d for d in details)
    assert any("refs[1].split must be a string" in d for d in details)
    assert any("refs[2].sentences[" in d for d in details) and report.exit_status() == 1
    total = sum(c["expressions"] for c in report.splits.values())
    assert total == sum(len(r["sentences"]) for r in refs) - 3  # the two bad refs' sentences and the empty one


def test_bad_segmentations_are_reported_with_the_annotation_id(tmp_path, written):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["rrsisd"][0], root)
    instances = root / "rrsisd" / "instances.json"
    data = json.loads(instances.read_text())
    anns = data["annotations"]
    anns[0]["segmentation"] = [[0, 0, 5, 0, 5, float("nan")]]  # JSON NaN in a polygon
    anns[1]["segmentation"] = {"size": [SIZE, SIZE], "counts": [5, -5, SIZE * SIZE]}
    anns[2]["segmentation"] = [{"size": [SIZE, SIZE], "counts": "0" + "P" * 7 + "0"}]
    instances.write_text(json.dumps(data))
    report = data_cli.scan("rrsisd", str(root))
    errors = sorted((p["path"], p["detail"]) for p in report.problems if p["kind"] not in data_cli.WARNING_KINDS)
    assert errors == sorted([
        (str(instances), f"annotation {anns[0]['id']}.segmentation: polygon 0 has a coordinate that is not a number "
                         f"within -{2 * SIZE}..{4 * SIZE}"),
        (str(instances), f"annotation {anns[1]['id']}.segmentation: counts[1] = -5 is not a run length (an integer "
                         f"0..{SIZE * SIZE})"),
        (str(instances), f"annotation {anns[2]['id']}.segmentation: value 1 spans 8 characters; no count of a mask "
                         "needs more than 7")])
    lost = {a["id"] for a in anns[:3]}
    refs = pickle.loads((root / "rrsisd" / "refs(unc).p").read_bytes())
    kept = sum(len(r["sentences"]) for r in refs if r["ann_id"] not in lost)
    assert sum(c["expressions"] for c in report.splits.values()) == kept and report.exit_status() == 1


def test_jsonl_bad_counts_name_the_line(tmp_path, written):
    import shutil

    root = tmp_path / "j"
    shutil.copytree(written["jsonl"][0], root)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if json.loads(line)["mask"] is not None)
    record = json.loads(lines[number - 1])
    record["mask"]["counts"] = record["mask"]["counts"][:-1] + "P"  # 'P': another character follows
    lines[number - 1] = json.dumps(record)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    report = data_cli.scan("jsonl", str(root))
    errors = [p["detail"] for p in report.problems if p["kind"] not in data_cli.WARNING_KINDS]
    assert errors == [f"line {number}.mask: the last value is not terminated (the string is cut short)"]
    assert sum(c["expressions"] for c in report.splits.values()) == len(lines) - 1  # only that line is lost


def test_one_bit_and_palette_masks(tmp_path, written):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(written["refsegrs"][0], root)
    masks = sorted((root / "masks").iterdir())
    Image.open(masks[0]).convert("1").save(masks[0])
    Image.open(masks[1]).convert("P").save(masks[1])
    ds = ReferringDataset(str(root), "train", training=False, format="refsegrs")
    for m in masks[:2]:
        if m.name in ds.names:
            assert ds.read_original(ds.names.index(m.name))["masks"].any()


@pytest.mark.parametrize("kind", ["rgb", "grey", "rgba", "palette", "rgb16"])
def test_png_images_decode_to_the_same_pixels_as_pil(tmp_path, written, kind):
    """Whatever the PNG mode, the training sample and the original image hold exactly the RGB pixels PIL reads
    (grey replicated, alpha dropped, palette expanded): a guard for any change of decoder."""
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["risbench"][0], root)
    path = sorted((root / "img_rgb").iterdir())[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    if kind == "grey":
        Image.fromarray(rgb).convert("L").save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(path)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(path)
    elif kind == "rgb16":  # PIL saves RGB with 8 bits only: a PNG written by hand
        from test_pictures import _png_16bit_rgb

        path.write_bytes(_png_16bit_rgb(rgb))
    expected = np.asarray(Image.open(path).convert("RGB"))
    ds = ReferringDataset(str(root), "train", training=False, resolution=SIZE, format="risbench")
    index = ds.names.index(path.name)
    np.testing.assert_array_equal(ds.read_original(index)["image"], expected)
    np.testing.assert_array_equal(ds[index].image.permute(1, 2, 0).numpy(), expected)


def test_truncated_png_is_a_data_error_naming_the_file(tmp_path, written):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(written["risbench"][0], root)
    path = sorted((root / "img_rgb").iterdir())[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = ReferringDataset(str(root), "train", training=False, resolution=SIZE, format="risbench")
    with pytest.raises(DataError, match=path.name):
        ds.read_original(ds.names.index(path.name))
