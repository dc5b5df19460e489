"""Data pipeline: tokenizer parity with the official tokenizer, RISORS reader, negatives, bad input, transforms,
collate, samplers and the synthetic dataset generator. CPU only, tiny images."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from rsam.data.batch import Batch, Collator, ImageSample, cap_expressions
from rsam.data.dataset import ReferringDataset
from rsam.data.errors import DataError
from rsam.data.loaders import build_eval_loader, build_train_loader
from rsam.data.samplers import ShardedEvalSampler, TrainSampler
from rsam.data.synthetic import generate, resolve
from rsam.data.tokenizer import RSAMTokenizer
from rsam.data.transforms import EvalTransform, TrainTransform, paint_black_boxes, swap_left_right

VOCAB = "bert-base-uncased-vocab.txt"
# pycocotools (<= 2.0.8) calls np.array(copy=False) on its own buffer objects, which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ------------------------------------------------------------------------------------------------ helpers


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _record(mask: np.ndarray, description: str, category: str) -> dict:
    return {"segmentation": _rle(mask), "area": float(mask.sum()), "description": description, "name": category}


def _write(root: Path, name: str, records: List[dict], size=(32, 32), seed: int = 0) -> None:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
    (root / "Annotations" / f"{name}.json").write_text(json.dumps({"annotations": records}))


def _split(root: Path, split: str, names: List[str]) -> None:
    (root / f"RISORS_{split}.txt").write_text("".join(f"{n}\n" for n in names))


def _box(size=(32, 32), y=4, x=4, h=8, w=8) -> np.ndarray:
    m = np.zeros(size, dtype=bool)
    m[y : y + h, x : x + w] = True
    return m


class _FakeTokenizer:
    """Length-1 ids; keeps collate tests independent of the vocabulary file."""

    def __call__(self, texts):
        n = len(texts)
        return torch.arange(n, dtype=torch.long)[:, None], torch.ones((n, 1), dtype=torch.long)


def _sample(name: str, k: int, r: int = 8, epoch: int = 0) -> ImageSample:
    return ImageSample(
        name=name,
        image=torch.full((3, r, r), 128, dtype=torch.uint8),
        masks=torch.zeros((k, r, r), dtype=torch.bool),
        descriptions=[f"{name} expression {j}" for j in range(k)],
        categories=["c"] * k,
        annotation_ids=list(range(k)),
        is_negative=[False] * k,
        orig_size=(r, r),
        epoch=epoch,
    )


@pytest.fixture(scope="module")
def tokenizer(reference_file) -> RSAMTokenizer:
    return RSAMTokenizer(str(reference_file(VOCAB)), mode="official")


@pytest.fixture(scope="module")
def golden(reference_file) -> dict:
    return json.loads(reference_file("golden_tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    scenes = generate(str(root), num_images=12, size=128, seed=3, neg_ratio=0.7)
    return root, scenes


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_official_expressions(tokenizer, golden):
    assert tokenizer.vocab_size == golden["vocab"]["lines"] == 30522
    mismatches = [e["text"] for e in golden["expressions"] if tokenizer.encode(e["text"]) != e["input_ids"]]
    assert not mismatches, f"ids differ from the official tokenizer for {mismatches}"
    assert len(golden["expressions"]) == 32
    long = golden["expressions"][-1]
    assert len(tokenizer.encode(long["text"])) == long["num_tokens"] == 87  # never truncated in official mode


def test_collate_matches_official_batches(tokenizer, golden):
    for gb in golden["batches"]:
        samples = []
        for i, texts in enumerate(gb["images"]):
            s = _sample(f"img{i}", len(texts))
            s.descriptions = list(texts)
            samples.append(s)
        batch = Collator(tokenizer, max_expressions_per_batch=None)(samples)
        assert batch.expr_to_image.tolist() == gb["flat_obj_to_img_idx"]
        assert list(batch.input_ids.shape) == gb["shape_input_ids"][1:]
        assert batch.input_ids.tolist() == gb["input_ids"]
        assert batch.attention_mask.tolist() == gb["attention_mask"]


def test_tokenizer_standard_mode_truncates_and_keeps_sep(reference_file, golden):
    tok = RSAMTokenizer(str(reference_file(VOCAB)), mode="standard", max_tokens=47)
    long, plane = golden["expressions"][-1], "a plane"
    ids, mask = tok([long["text"], plane])
    assert ids.shape == (2, 47)
    assert ids[0].tolist() == long["input_ids"][:46] + [102]
    assert ids[1, :4].tolist() == [101, 1037, 4946, 102] and ids[1, 4:].eq(0).all()
    assert mask[1].tolist() == [1] * 4 + [0] * 43 and mask[0].eq(1).all()
    assert tok([""])[0].tolist() == [[101, 102]]
    with pytest.raises(ValueError, match="mode"):
        RSAMTokenizer(str(reference_file(VOCAB)), mode="bert")


def test_tokenizer_from_hf_directory(reference_file, tmp_path, golden):
    (tmp_path / "vocab.txt").write_bytes(reference_file(VOCAB).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    tok = RSAMTokenizer(str(tmp_path), mode="official")
    assert all(tok.encode(e["text"]) == e["input_ids"] for e in golden["expressions"])
    with pytest.raises(FileNotFoundError, match="nope"):
        RSAMTokenizer(str(tmp_path / "nope"))
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": tru')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        RSAMTokenizer(str(tmp_path))


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(str(a), num_images=4, size=96, seed=7, neg_ratio=0.5)
    generate(str(b), num_images=4, size=96, seed=7, neg_ratio=0.5)
    generate(str(c), num_images=4, size=96, seed=8, neg_ratio=0.5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 2 + 3 + 1  # images, annotations, split lists, vocab.txt
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between two runs with the same seed"
    assert (a / "Annotations/synthetic_000000.json").read_bytes() != (c / "Annotations/synthetic_000000.json").read_bytes()


def test_synthetic_expressions_refer_to_exactly_one_object(synthetic):
    root, scenes = synthetic
    kinds = set()
    n_neg = 0
    for scene in scenes:
        assert 3 <= len(scene.objects) <= 6
        assert len(set(scene.descriptions)) == len(scene.descriptions), f"repeated expression in {scene.name}"
        for text, target, kind in zip(scene.descriptions, scene.targets, scene.kinds):
            kinds.add(kind)
            expected = [] if target is None else [target]
            assert resolve(text, scene.objects) == expected, f"{scene.name}: {text!r}"
            n_neg += target is None
        data = json.loads((root / "Annotations" / f"{scene.name}.json").read_text())
        assert [r["description"] for r in data["annotations"]] == scene.descriptions
        for r, target in zip(data["annotations"], scene.targets):
            assert set(r) == {"segmentation", "area", "description", "name"}
            assert (r["area"] == 0) == (target is None)
    assert n_neg > 0 and {"category", "colour", "relation"} <= kinds


# ------------------------------------------------------------------------------------------------ reader


def test_reader_round_trip_on_synthetic(synthetic, tmp_path):
    root, scenes = synthetic
    by_name = {s.name: s for s in scenes}
    train_names = (root / "RISORS_train.txt").read_text().split()
    ds = ReferringDataset(str(root), "train", training=False, resolution=128)
    assert ds.names == train_names and len(ds) == sum(s.split == "train" for s in scenes)
    for i in range(len(ds)):
        sample = ds[i]
        scene = by_name[sample.name]
        positives = [(t, d) for t, d in zip(scene.targets, scene.descriptions) if t is not None]
        assert sample.descriptions == [d for _, d in positives]  # area-0 records skipped (official rule)
        assert sample.image.shape == (3, 128, 128) and sample.orig_size == (128, 128)
        assert sample.masks.dtype == torch.bool and sample.masks.shape == (len(positives), 128, 128)
        for m, (t, _) in zip(sample.masks, positives):
            obj = scene.objects[t]
            assert int(m.sum()) == obj.area
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert abs((xs.float().mean().item() + 0.5) / 128 - obj.cx) < 1e-4
            assert abs((ys.float().mean().item() + 0.5) / 128 - obj.cy) < 1e-4
        assert sample.categories == [scene.objects[t].category for t, _ in positives]
    assert ds.bad_sample_counts()["zero_area"] == sum(
        t is None for s in scenes if s.split == "train" for t in s.targets
    )
    # empty_annotations="negative": the area-0 records come back as in-image no-target expressions
    ds_neg = ReferringDataset(str(root), "train", training=False, resolution=64, empty_annotations="negative")
    for i in range(len(ds_neg)):
        s = ds_neg[i]
        scene = by_name[s.name]
        assert s.descriptions == scene.descriptions
        assert s.is_negative == [t is None for t in scene.targets]
        assert all(not m.any() for m, neg in zip(s.masks, s.is_negative) if neg)
    # a hand-written split list with whitespace, extensions and blank lines
    lst = tmp_path / "list.txt"
    lst.write_text(f"  {train_names[0]}.jpg \n\n{train_names[1]}\t\n")
    assert ReferringDataset(str(root), reader_options={"file_list": str(lst)}, training=False).names == train_names[:2]
    # original-resolution access for scoring
    orig = ds.read_original(0)
    assert orig["image"].shape == (128, 128, 3) and orig["masks"].shape[1:] == (128, 128)


def test_reader_accepts_bytes_and_uncompressed_rle(tmp_path):
    m = _box()
    rec_bytes = _record(m, "a", "x")
    rec_list = _record(m, "b", "y")
    runs, value, run = [], False, 0  # uncompressed COCO RLE: column-major run lengths, zeros first
    for v in m.ravel(order="F"):
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    rec_list["segmentation"]["counts"] = runs + [run]
    _write(tmp_path, "img", [rec_bytes, rec_list])
    _split(tmp_path, "test", ["img"])
    ds = ReferringDataset(str(tmp_path), "test", resolution=32)
    # a bytes RLE (as pycocotools returns it) goes through the same parser as the JSON str
    from rsam.data.readers.risors import _parse_record

    seg = dict(rec_bytes["segmentation"], counts=rec_bytes["segmentation"]["counts"].encode())
    assert _parse_record(dict(rec_bytes, segmentation=seg), 0, "x.json").segmentation["counts"] == seg["counts"]
    sample = ds[0]
    assert torch.equal(sample.masks[0], torch.from_numpy(m)) and torch.equal(sample.masks[1], torch.from_numpy(m))


def _test_masks() -> List[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.zeros((37, 53), bool), np.ones((37, 53), bool), np.ones((1, 1), bool), np.zeros((1, 7), bool)]
    m = np.zeros((37, 53), bool)
    m[30:, 4] = m[:5, 5] = True  # a foreground run that wraps from one column into the next
    out.append(m)
    m = np.zeros((37, 53), bool)
    m[0, :] = m[:, -1] = True  # touches the borders
    out.append(m)
    yy, xx = np.mgrid[0:64, 0:48]
    for _ in range(6):
        cy, cx, ry, rx = rng.uniform(0, 64), rng.uniform(0, 48), rng.uniform(1, 30), rng.uniform(1, 30)
        out.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    out.append(rng.random((7, 1)) > 0.5)
    out.append(rng.random((20, 30)) > 0.7)
    out.append(rng.random((64, 64)) > 0.5)  # ~2000 runs
    return out


def test_rle_decoder_matches_pycocotools(tmp_path):
    from rsam.data.readers import Annotation
    from rsam.data.readers.risors import RISORSReader
    from rsam.data.rle import check_rle, decode_rles

    masks = _test_masks()
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    for m, rle in zip(masks, rles):
        ref = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(ref, m)
        assert check_rle(rle["counts"], *m.shape) == int(mask_utils.area(rle)) == int(m.sum())
        for counts in (rle["counts"], rle["counts"].decode()):
            decoded = decode_rles([{"size": list(m.shape), "counts": counts}] * 2, *m.shape)
            assert decoded.dtype == bool and decoded.flags.c_contiguous, m.shape
            assert np.array_equal(decoded, np.stack([ref, ref])), f"{m.shape} mask decoded differently"
    (tmp_path / "JPEGImages").mkdir()
    reader = RISORSReader(str(tmp_path), split=None)  # an empty image folder is enough to decode masks
    for shape in ((64, 48), (64, 64)):  # ellipses; the 64x64 noise mask
        group = [(m, r) for m, r in zip(masks, rles) if m.shape == shape]
        anns = [Annotation(i, "x", "c", 1.0, {"size": list(shape), "counts": r["counts"]}) for i, (_, r) in enumerate(group)]
        decoded = reader.decode_masks("img", anns, shape)
        assert decoded.flags["C_CONTIGUOUS"] and np.array_equal(decoded, np.stack([m for m, _ in group]))
    bad = [
        Annotation(0, "x", "c", 1.0, {"size": [37, 53], "counts": rles[4]["counts"][:-1]}),  # truncated
        Annotation(0, "x", "c", 1.0, {"size": [37, 54], "counts": rles[4]["counts"]}),  # runs != h*w
        Annotation(0, "x", "c", 1.0, {"size": [37, 53], "counts": [5, -3, 37 * 53 - 2]}),  # negative run
        Annotation(0, "x", "c", 1.0, {"size": [37, 53], "counts": "0" + "o" * 13 + "0"}),  # one 65-bit value
        Annotation(0, "x", "c", 1.0, {"size": [37, 53], "counts": "0" + "ooooooooooo?" * 40}),  # values that grow
    ]
    for ann in bad:
        with pytest.raises(DataError, match=r"img\.json: annotations\[0\]\.segmentation: invalid RLE"):
            reader.decode_masks("img", [ann], tuple(ann.segmentation["size"]))
    mixed = [Annotation(2, "x", "c", 1.0, {"size": [37, 53], "counts": rles[4]["counts"]}),
             Annotation(5, "x", "c", 1.0, {"size": [37, 54], "counts": rles[4]["counts"]})]
    with pytest.raises(DataError, match=r"img\.json: annotations\[5\]\.segmentation\.size \[37, 54\] != image size "
                                        r"\[37, 53\]"):
        reader.decode_masks("img", mixed, (37, 53))


def test_rle_checks_say_what_is_wrong_before_pycocotools_reads_anything():
    from rsam.data.rle import check_rle, check_size, encode_rle, polygons_to_rle

    good = _rle(_box((4, 4), 1, 1, 2, 2))["counts"]
    with pytest.raises(ValueError, match=r"character b'\\x00' at position 2 is not in the RLE alphabet"):
        check_rle("1c\u0000" + "1" * 3000, 64, 64)  # issue 28: pycocotools wrote past its buffer
    strings = {
        "1" * 200: "the counts string has 200 characters, more than any 16-pixel mask needs",
        good + "é": r"character 'é' at position \d+ is not in the RLE alphabet",
        good[:-1] + "P": "the last value is not terminated",
        "": "the counts string is empty",
        "0" + "P" * 7 + "0": "value 1 spans 8 characters",
        "01": "the runs add up to 1 pixels, a 4x4 mask has 16",  # short: pycocotools left the rest unwritten
        "0O": r"run 1 is negative \(-1\)",
    }
    for counts, message in strings.items():
        with pytest.raises(ValueError, match=message):
            check_rle(counts, 4, 4)
    lists = (([16, True], r"counts\[1\] = True is not a run length"), ([3.0, 13], r"counts\[0\]"),
             ([5, -1, 12], r"counts\[1\] = -1"), ([5, 10], "add up to 15 pixels"),
             (12345, "counts must be a string or a list of run lengths, got int"))
    for counts, message in lists:
        with pytest.raises(ValueError, match=message):
            check_rle(counts, 4, 4)
    assert check_rle(good, 4, 4) == check_rle(good.encode(), 4, 4) == check_rle([5, 2, 2, 2, 5], 4, 4) == 4
    for size, message in (([0, 4], "two positive integers"), ([True, 4], "two positive"), ("44", "two positive"),
                          ([100_000, 100_000], "over the limit of 67108864 pixels")):
        with pytest.raises(ValueError, match=message):
            check_size(size)
    polygons = (([[0, 0, 3, 0, 3]], "polygon 0 must be a list of at least 3"), ([[0, 0, 3, 0]], "at least"),
                ([[0, 0, 3, float("nan"), 3, 3]], "polygon 0 has a coordinate"),
                ([[0, 0, 3, 0, 3, 1e9]], "polygon 0 has a coordinate"),
                ([[0, 0, 16, 16] * 300], r"outlines are 9600 px long, over 1000 x \(height \+ width\)"))
    for polygon, message in polygons:
        with pytest.raises(ValueError, match=message):
            polygons_to_rle(polygon, 4, 4)
    square = mask_utils.decode(polygons_to_rle([[0.5, 0.5, 2.5, 0.5, 2.5, 2.5, 0.5, 2.5]], 4, 4)).astype(bool)
    assert square.sum() > 0 and encode_rle(square) == _rle(square)


def test_a_bad_rle_record_is_reported_and_the_others_kept(tmp_path):
    bad = _record(_box(), "broken", "x")
    bad["segmentation"]["counts"] = bad["segmentation"]["counts"][:3] + "\u0000" + bad["segmentation"]["counts"][3:]
    _write(tmp_path, "img", [_record(_box(), "fine", "x"), bad, _record(_box(y=20), "also fine", "x")])
    _split(tmp_path, "val", ["img"])
    with pytest.raises(DataError, match=r"img\.json: annotations\[1\]\.segmentation\.counts: character b'\\x00' "
                                        "at position 3 is not in the RLE alphabet"):
        ReferringDataset(str(tmp_path), "val")[0]
    ds = ReferringDataset(str(tmp_path), "val", resolution=32, skip_bad_samples=True)
    assert ds[0].descriptions == ["fine", "also fine"] and ds.bad_sample_counts()["field"] == 1


# ------------------------------------------------------------------------------------------------ negatives


@pytest.fixture(scope="module")
def category_dataset(tmp_path_factory) -> Path:
    """40 images, 10 per category a..d, one expression each (so every image has eligible negatives)."""
    root = tmp_path_factory.mktemp("cats")
    names = []
    for i in range(40):
        cat = "abcd"[i % 4]
        names.append(f"im_{i}")
        mask = _box(size=(16, 16), y=2, x=2, h=6, w=6)
        _write(root, f"im_{i}", [_record(mask, f"the {cat} number {i}", cat)], size=(16, 16), seed=i)
    _split(root, "train", names)
    return root


def _negatives(sample: ImageSample) -> List[str]:
    return [d for d, n in zip(sample.descriptions, sample.is_negative) if n]


def test_negatives_rate_and_validity(category_dataset):
    ds = ReferringDataset(str(category_dataset), "train", resolution=16, negative_ratio=1.0, seed=5)
    counts = []
    for epoch in range(10):
        for i in range(len(ds)):
            s = ds[(i, epoch)]
            own = s.categories[0]
            counts.append(sum(s.is_negative))
            for j, neg in enumerate(s.is_negative):
                if neg:
                    assert s.categories[j] != own and s.annotation_ids[j] < 0
                    assert not s.masks[j].any() and not s.descriptions[j].endswith(f"number {i}")
            assert s.annotation_ids[sum(not n for n in s.is_negative):] == [-1 - j for j in range(counts[-1])]
    mean = float(np.mean(counts))
    assert abs(mean - 1.0) < 0.2, f"mean negatives per image {mean:.3f}, expected Poisson(1.0)"
    assert 0.15 < np.mean(np.asarray(counts) == 0) < 0.6  # P(k=0) = e^-1 = 0.37
    ds0 = ReferringDataset(str(category_dataset), "train", resolution=16, negative_ratio=0.0)
    assert all(not any(ds0[(i, 0)].is_negative) for i in range(len(ds0)))


def test_negatives_reproducible_and_different_across_workers(category_dataset):
    def draws(seed: int, workers: int, epoch: int = 0) -> List[tuple]:
        ds = ReferringDataset(str(category_dataset), "train", resolution=16, negative_ratio=1.0, seed=seed)
        order = [(i, epoch) for i in range(len(ds))]
        loader = DataLoader(ds, batch_size=1, sampler=order, num_workers=workers, collate_fn=lambda b: b[0])
        return [(s.name, tuple(_negatives(s))) for s in loader]

    a = draws(seed=1, workers=0)
    assert a == draws(seed=1, workers=0)  # same seed: same draws
    assert a == draws(seed=1, workers=2)  # whatever the number of workers
    assert a != draws(seed=2, workers=0)
    assert a != draws(seed=1, workers=0, epoch=1)  # a new epoch draws anew
    # docs/official_differences.md, B1: every worker replayed the same random sequence. Here the two workers' sequences of
    # draws (worker w gets samples w, w+2, ...) must differ.
    per_worker = [[len(n) for _, n in a[w::2]] for w in range(2)]
    assert per_worker[0] != per_worker[1]


# ------------------------------------------------------------------------------------------------ bad input


def _bad_dataset(root: Path, case: str) -> str:
    """Two good images plus one bad image ``bad`` of the given kind; returns the file that must be named."""
    good = [_record(_box(), "the good one", "x"), _record(_box(y=20), "the other one", "y")]
    _write(root, "ok_1", good, seed=1)
    _write(root, "ok_2", good, seed=2)
    names = ["ok_1", "bad", "ok_2"]
    jpg, js = root / "JPEGImages" / "bad.jpg", root / "Annotations" / "bad.json"
    _write(root, "bad", good, seed=3)
    if case == "image":
        jpg.write_bytes(b"definitely not a jpeg")
        named = jpg
    elif case == "truncated":
        data = (root / "JPEGImages" / "ok_1.jpg").read_bytes()
        jpg.write_bytes(data[: len(data) // 2])
        named = jpg
    elif case == "json":
        js.write_text('{"annotations": [')
        named = js
    elif case == "field":
        rec = dict(good[0])
        del rec["description"]
        js.write_text(json.dumps({"annotations": [rec]}))
        named = js
    elif case == "size":
        js.write_text(json.dumps({"annotations": [_record(np.ones((40, 32), bool), "too tall", "x")]}))
        named = js
    elif case == "description":
        js.write_text(json.dumps({"annotations": [_record(_box(), "   ", "x")]}))
        named = js
    else:
        raise AssertionError(case)
    _split(root, "val", names)
    return str(named)


BAD_CASES = {"image": "image", "truncated": "image", "json": "json", "field": "field", "size": "size",
             "description": "description"}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_naming_the_file(tmp_path, case):
    named = _bad_dataset(tmp_path, case)
    ds = ReferringDataset(str(tmp_path), "val", resolution=32)
    assert ds[0] is not None
    for read in (ds.__getitem__, ds.read_original):  # training/eval sample and the original-resolution reader
        with pytest.raises(DataError) as err:
            read(1)
        assert named in str(err.value) and err.value.reason == BAD_CASES[case]
    if case == "size":  # the field, both sizes and the image are named
        assert "annotations[0].segmentation.size [40, 32] != image size [" in str(err.value)
        assert "bad.jpg" in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_skipped_and_counted(tmp_path, case, caplog):
    named = _bad_dataset(tmp_path, case)
    ds = ReferringDataset(str(tmp_path), "val", resolution=32, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING, logger="rsam.data.readers.risors"):
        samples = [ds[i] for i in range(len(ds))]
    assert samples[1] is None and samples[0] is not None and samples[2] is not None
    counts = ds.bad_sample_counts()
    assert counts[BAD_CASES[case]] == 1, counts
    # a record-level problem leaves the image without any usable record
    assert sum(v for k, v in counts.items() if k != "zero_area") == 1 + (case in ("field", "size", "description"))
    assert any(named in r.getMessage() for r in caplog.records)
    # the eval collate drops the skipped image; an all-bad batch is None
    collate = Collator(_FakeTokenizer())
    assert collate(samples).num_images == 2 and collate([None]) is None
    # training replaces a bad image with another one instead of shrinking the batch
    ds_train = ReferringDataset(str(tmp_path), "val", training=True, resolution=32, skip_bad_samples=True)
    assert ds_train[(1, 0)].name in ("ok_1", "ok_2")
    ds.reset_bad_sample_counts()
    assert not any(ds.bad_sample_counts().values())


def test_bad_record_skipped_keeps_good_records(tmp_path):
    recs = [_record(_box(), "fine", "x"), {"segmentation": _rle(_box()), "area": 64.0, "name": "x"}]
    _write(tmp_path, "img", recs)
    _split(tmp_path, "val", ["img"])
    with pytest.raises(DataError, match=r"img\.json: annotations\[1\] has no 'description'"):
        ReferringDataset(str(tmp_path), "val")[0]
    ds = ReferringDataset(str(tmp_path), "val", resolution=32, skip_bad_samples=True)
    assert ds[0].descriptions == ["fine"] and ds.bad_sample_counts()["field"] == 1


def test_split_list_naming_missing_file(tmp_path):
    _write(tmp_path, "ok", [_record(_box(), "fine", "x")])
    _split(tmp_path, "test", ["ok", "ghost"])
    with pytest.raises(DataError) as err:
        ReferringDataset(str(tmp_path), "test")
    assert "RISORS_test.txt" in str(err.value) and "ghost.jpg" in str(err.value)
    ds = ReferringDataset(str(tmp_path), "test", skip_bad_samples=True)
    assert ds.names == ["ok"] and ds.bad_sample_counts()["missing_file"] == 2  # image and annotation file


def test_bad_counts_reach_the_main_process_from_workers(tmp_path):
    _bad_dataset(tmp_path, "json")
    ds = ReferringDataset(str(tmp_path), "val", resolution=32, skip_bad_samples=True)
    loader = build_eval_loader(ds, Collator(_FakeTokenizer()), batch_size=1, num_workers=2)
    batches = list(loader)
    assert sum(b is None for b in batches) == 1
    assert ds.bad_sample_counts()["json"] == 1


# ------------------------------------------------------------------------------------------------ transforms


def _square_image(size=(64, 64), y=16, x=24, s=16):
    img = np.full((*size, 3), 200, dtype=np.uint8)
    img[y : y + s, x : x + s] = 20
    mask = np.zeros((1, *size), dtype=bool)
    mask[0, y : y + s, x : x + s] = True
    return img, mask


@pytest.mark.parametrize("resolution", [32, 48, 128])
def test_transforms_keep_masks_binary_and_aligned(resolution):
    img, mask = _square_image()
    scale = resolution / 64
    for transform in (EvalTransform(resolution), TrainTransform(resolution, 0.0)):
        image, masks, texts = transform(img, mask, ["x"], np.random.default_rng(0))
        assert image.dtype == torch.uint8 and image.shape == (3, resolution, resolution)
        assert masks.dtype == torch.bool and masks.shape == (1, resolution, resolution)
        ys, xs = torch.nonzero(masks[0], as_tuple=True)
        # the square [16,32) x [24,40) maps to [16s,32s) x [24s,40s), give or take one pixel at the edges
        assert abs(ys.min().item() - 16 * scale) <= 1 and abs(ys.max().item() + 1 - 32 * scale) <= 1
        assert abs(xs.min().item() - 24 * scale) <= 1 and abs(xs.max().item() + 1 - 40 * scale) <= 1
        dark = image[0] < 110
        assert (dark == masks[0]).float().mean() > 0.98  # image and mask stay aligned


def test_eval_transform_keeps_pixels_and_is_deterministic():
    img, mask = _square_image()
    t = EvalTransform(64)
    a, ma, _ = t(img, mask, ["x"])
    b, mb, _ = t(img, mask, ["x"])
    assert torch.equal(a, b) and torch.equal(ma, mb) and torch.equal(ma, torch.from_numpy(mask))
    assert a.dtype == torch.uint8 and torch.equal(a, torch.from_numpy(img).permute(2, 0, 1))


def test_black_boxes_bounded_per_axis_and_masks_untouched():
    rng = np.random.default_rng(0)
    image = torch.full((3, 40, 100), 255, dtype=torch.uint8)
    paint_black_boxes(image, rng, count=(20, 20), size=32)
    black = (image == 0).all(0)
    assert black.any() and (image[:, ~black] == 255).all()
    assert black.sum() <= 20 * 32 * 32
    # Per-axis bounds: every box lies fully inside, so each blackened row/column has >= 32 black pixels (with the
    # official width-only bound, boxes would start as low as row 68 and be clipped).
    assert (black.sum(0)[black.any(0)] >= 32).all() and (black.sum(1)[black.any(1)] >= 32).all()
    assert black[:, 68:].any()  # and they reach the far end of the long axis
    img, mask = _square_image()
    t = TrainTransform(64, black_box_prob=1.0)
    out, masks, _ = t(img, mask, ["x"], np.random.default_rng(1))
    assert (out == 0).all(0).sum() >= 32 * 32 and torch.equal(masks, torch.from_numpy(mask))


def test_flip_swaps_left_and_right():
    assert swap_left_right("the Left-most ship, left of the RIGHT tank (west)") == (
        "the Right-most ship, right of the LEFT tank (east)"
    )
    img, mask = _square_image()
    t = TrainTransform(64, black_box_prob=0.0, hflip_prob=1.0)
    image, masks, texts = t(img, mask, ["the plane on the left"], np.random.default_rng(0))
    assert texts == ["the plane on the right"]
    assert torch.equal(masks[0], torch.from_numpy(mask[0][:, ::-1].copy()))
    assert torch.equal(image, torch.from_numpy(img[:, ::-1].copy()).permute(2, 0, 1))
    assert TrainTransform(64)(img, mask, ["left"], np.random.default_rng(0))[2] == ["left"]  # off by default


# ------------------------------------------------------------------------------------------------ collate


def test_collate_caps_expressions_and_keeps_one_per_image():
    collate = Collator(_FakeTokenizer(), max_expressions_per_batch=24, seed=0)
    samples = [_sample(f"im{i}", 6) for i in range(6)]  # 36 expressions
    batch = collate(samples)
    assert isinstance(batch, Batch) and batch.num_expressions == 24 and batch.num_images == 6
    per_image = torch.bincount(batch.expr_to_image, minlength=6)
    assert (per_image >= 1).all() and batch.expr_to_image.tolist() == sorted(batch.expr_to_image.tolist())
    for name, aid in batch.sample_ids:  # annotation order kept within an image
        assert name.startswith("im")
    again = collate(samples)
    assert again.sample_ids == batch.sample_ids  # seeded
    other_epoch = collate([_sample(f"im{i}", 6, epoch=1) for i in range(6)])
    assert other_epoch.sample_ids != batch.sample_ids
    many = collate([_sample(f"im{i}", 2) for i in range(30)])  # more images than the cap: one each
    assert many.num_expressions == 30 and torch.bincount(many.expr_to_image).eq(1).all()
    small = collate([_sample("a", 3), _sample("b", 2)])
    assert small.num_expressions == 5  # under the cap nothing is dropped
    assert Collator(_FakeTokenizer(), None)(samples).num_expressions == 36


def test_cap_expressions_properties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(1, 9, size=rng.integers(1, 10)).tolist()
        keep = cap_expressions(counts, 24, rng)
        assert sum(len(k) for k in keep) == min(sum(counts), max(24, len(counts)))
        assert all(len(k) >= 1 and len(set(k.tolist())) == len(k) and (k < c).all() for k, c in zip(keep, counts))


def test_collate_batch_fields(synthetic, tokenizer):
    root, _ = synthetic
    ds = ReferringDataset(str(root), "train", training=True, resolution=64, negative_ratio=1.0, seed=0)
    batch = Collator(tokenizer, 24)([ds[(i, 0)] for i in range(4)])
    n = batch.num_expressions
    assert batch.images.shape == (4, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.masks.shape == (n, 64, 64) and batch.masks.dtype == torch.bool
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[0] == n
    assert batch.input_ids.dtype == torch.long and (batch.input_ids[:, 0] == 101).all()
    assert batch.is_negative.shape == (n,) and batch.orig_sizes.tolist() == [[128, 128]] * 4
    assert len(batch.categories) == len(batch.sample_ids) == n
    assert not batch.masks[batch.is_negative].any() and batch.masks[~batch.is_negative].flatten(1).any(1).all()
    assert all((aid < 0) == neg for (_, aid), neg in zip(batch.sample_ids, batch.is_negative.tolist()))
    assert torch.equal(batch.images[0], ds[(0, 0)].image)  # raw bytes: the model normalises them
    per_image = [ds[(i, 0)].num_expressions for i in range(4)]
    assert torch.bincount(batch.expr_to_image, minlength=4).tolist() == per_image



@pytest.mark.parametrize("num_workers", [0, 1])
def test_collated_images_keep_the_decoded_pixel_order(synthetic, tokenizer, num_workers):
    """The batch is a channels-last (B,3,R,R) view of (B,R,R,3) memory, in the worker's shared memory too: filling
    it is one memcpy per image (a strided HWC -> CHW copy cost ~1 ms per 800 px image); the values are the
    samples' own."""
    root, _ = synthetic
    ds = ReferringDataset(str(root), "train", training=False, resolution=64, seed=0)
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=Collator(tokenizer))
    batch = next(iter(loader))
    assert batch.images.shape == (3, 3, 64, 64) and batch.images.permute(0, 2, 3, 1).is_contiguous()
    for i in range(3):
        assert torch.equal(batch.images[i], ds[i].image)
    if num_workers:
        assert batch.images.is_shared()



def _batch_fields(images=None, expr_to_image=None, n=3):
    return dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8) if images is None else images,
                masks=torch.zeros(n, 8, 8, dtype=torch.bool),
                expr_to_image=torch.tensor([0, 1, 1]) if expr_to_image is None else expr_to_image,
                input_ids=torch.ones(n, 4, dtype=torch.long), attention_mask=torch.ones(n, 4, dtype=torch.long),
                is_negative=torch.zeros(n, dtype=torch.bool), orig_sizes=torch.full((2, 2), 8),
                categories=["ship"] * n, sample_ids=[("a", i) for i in range(n)])


@pytest.mark.parametrize("change, message", [
    (dict(expr_to_image=torch.tensor([0, 2, 1])), "must index the 2 images"),
    (dict(expr_to_image=torch.tensor([-1, 0, 1])), "must index the 2 images"),
    (dict(images=torch.zeros(2, 3, 8, 8)), "must be uint8"),
    (dict(expr_to_image=torch.tensor([0, 1])), "expr_to_image has 2 rows for 3 expressions"),
])
def test_batch_rejects_inconsistent_fields(change, message):
    Batch(**_batch_fields())  # the unchanged fields are valid
    with pytest.raises(ValueError, match=message):
        Batch(**_batch_fields(**change))


# ------------------------------------------------------------------------------------------------ samplers


def test_sharded_eval_sampler_covers_each_image_once():
    for n, world in ((10, 3), (7, 4), (2, 4)):
        shards = [list(ShardedEvalSampler(n, rank=r, world_size=world)) for r in range(world)]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n)) and len(flat) == n
        assert [len(ShardedEvalSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


def test_train_loader_epochs_and_workers(category_dataset):
    ds = ReferringDataset(str(category_dataset), "train", resolution=16, negative_ratio=0.5)
    loader = build_train_loader(ds, Collator(_FakeTokenizer(), 24), batch_size=4, num_workers=2, seed=0, rank=0,
                                world_size=2, persistent_workers=True)
    assert isinstance(loader.sampler, TrainSampler) and len(loader) == 5  # 20 of 40 images on this rank
    loader.sampler.set_epoch(0)
    e0 = [n for b in loader for n, a in b.sample_ids if a >= 0]  # one positive per image
    loader.sampler.set_epoch(1)
    e1 = [n for b in loader for n, a in b.sample_ids if a >= 0]
    assert len(e0) == len(e1) == 20 and e0 != e1  # reshuffled
    assert all(isinstance(k, tuple) and k[1] == 1 for k in loader.sampler)


def test_train_sampler_yields_epoch_and_resumes_mid_epoch():
    sampler = TrainSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == len(sampler) == 10 and all(e == 3 for _, e in full)
    assert sorted(i for i, _ in full) == list(range(10))
    sampler.set_start(4)
    assert list(sampler) == full[4:] and len(sampler) == 6
