"""The synthetic dataset in every release format: layouts and contents checked on the files, not through readers."""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rsam.data.rle import encode_rle
from rsam.data.synthetic import CATEGORIES, generate, main, make_scene
from rsam.data.synthetic.formats import DEFECT_CROPS, mask_polygons
from rsam.data.synthetic.language import negative_category

NUM_IMAGES, SIZE, SEED, NEG_RATIO = 6, 64, 1, 0.5
SPLITS = ("train", "val", "test")


def _write(root: Path, fmt: str = "risors", **options) -> list:
    return generate(str(root), NUM_IMAGES, SIZE, SEED, neg_ratio=NEG_RATIO, format=fmt, **options)


def _drawn(i: int) -> Tuple[np.ndarray, List[np.ndarray], list, list]:
    """What generate draws for image ``i``: the same generator and make_scene arguments."""
    return make_scene(np.random.default_rng([SEED, i]), SIZE, neg_ratio=NEG_RATIO)


def _decode(rle: dict) -> np.ndarray:
    assert isinstance(rle["counts"], str) and rle["size"] == [SIZE, SIZE]
    return mask_utils.decode(rle).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _phrase_lines(root: Path) -> Dict[str, List[Tuple[str, str]]]:
    out = {}
    for split in SPLITS:
        text = (root / f"output_phrase_{split}.txt").read_text(encoding="utf-8")
        out[split] = [tuple(line.split(" ", 1)) for line in text.splitlines()]
    return out


def _records_by_split(scenes) -> Dict[str, List[Tuple[int, Optional[int], str]]]:
    """(image index, target or None, text) of every record, per split, in writing order."""
    out: Dict[str, List[Tuple[int, Optional[int], str]]] = {s: [] for s in SPLITS}
    for i, scene in enumerate(scenes):
        for text, target in zip(scene.descriptions, scene.targets):
            out[scene.split].append((i, target, text))
    return out


# ------------------------------------------------------------------------------------------------ risors


def test_risors_output_is_unchanged(tmp_path):
    default = generate(str(tmp_path / "default"), NUM_IMAGES, SIZE, SEED, neg_ratio=NEG_RATIO)
    explicit = _write(tmp_path / "explicit", "risors")
    assert default == explicit
    files = sorted(p.relative_to(tmp_path / "default") for p in (tmp_path / "default").rglob("*") if p.is_file())
    assert len(files) == 2 * NUM_IMAGES + 3 + 1
    for f in files:
        assert (tmp_path / "default" / f).read_bytes() == (tmp_path / "explicit" / f).read_bytes(), f
    # The original writer, spelled out: JPEG at quality 92, the annotation JSON, the split lists.
    for i, scene in enumerate(default):
        image, masks, objs, records = _drawn(i)
        jpeg = io.BytesIO()
        Image.fromarray(image).save(jpeg, format="JPEG", quality=92)
        assert (tmp_path / "default" / "JPEGImages" / f"{scene.name}.jpg").read_bytes() == jpeg.getvalue()
        empty = encode_rle(np.zeros((SIZE, SIZE), dtype=bool))
        annotations = [
            {"segmentation": empty, "area": 0.0, "description": text, "name": negative_category(text)}
            if target is None else
            {"segmentation": encode_rle(masks[target]), "area": float(objs[target].area), "description": text,
             "name": objs[target].category}
            for text, target, _ in records
        ]
        expected = json.dumps({"annotations": annotations})
        assert (tmp_path / "default" / "Annotations" / f"{scene.name}.json").read_text() == expected
    for split in SPLITS:
        names = "".join(f"{s.name}\n" for s in default if s.split == split)
        assert (tmp_path / "default" / f"RISORS_{split}.txt").read_text() == names


@pytest.mark.parametrize("fmt", ["risors", "rrsisd", "refsegrs", "risbench", "jsonl"])
def test_every_format_draws_the_same_scenes_and_writes_vocab(tmp_path, fmt):
    scenes = _write(tmp_path / fmt, fmt)
    assert scenes == generate(str(tmp_path / "ref"), NUM_IMAGES, SIZE, SEED, neg_ratio=NEG_RATIO)
    assert (tmp_path / fmt / "vocab.txt").read_bytes() == (tmp_path / "ref" / "vocab.txt").read_bytes()


def test_options_for_another_format_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        _write(tmp_path, "coco")
    with pytest.raises(ValueError, match="polygons.*rrsisd"):
        _write(tmp_path, "refsegrs", polygons=True)
    with pytest.raises(ValueError, match="mask_channels.*refsegrs"):
        _write(tmp_path, "risbench", mask_channels=3)
    with pytest.raises(ValueError, match="mask_channels must be 1 or 3"):
        _write(tmp_path, "refsegrs", mask_channels=2)


# ------------------------------------------------------------------------------------------------ rrsisd


def test_rrsisd_layout_refs_and_instances(tmp_path):
    scenes = _write(tmp_path, "rrsisd")
    with open(tmp_path / "rrsisd" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    instances = json.loads((tmp_path / "rrsisd" / "instances.json").read_text())
    assert isinstance(refs, list)
    assert instances["categories"] == [{"id": i, "name": c} for i, c in enumerate(CATEGORIES)]
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {im["id"]: im for im in instances["images"]}
    assert len(images) == NUM_IMAGES and len(anns) == sum(len(s.objects) + s.targets.count(None) for s in scenes)
    for i, scene in enumerate(scenes):
        image, masks, objs, _ = _drawn(i)
        assert images[i] == {"id": i, "file_name": f"{scene.name}.jpg", "height": SIZE, "width": SIZE}
        path = tmp_path / "images" / "rrsisd" / "JPEGImages" / images[i]["file_name"]
        assert Image.open(path).size == (SIZE, SIZE)
        own = [a for a in instances["annotations"] if a["image_id"] == i]
        for a, mask, obj in zip(own, masks, objs):
            assert set(a) == {"id", "image_id", "segmentation", "bbox", "area", "categories_id"}
            assert a["categories_id"] == CATEGORIES.index(obj.category)
            (rle,) = a["segmentation"]
            assert np.array_equal(_decode(rle), mask)
            x, y, w, h = a["bbox"]
            rows, cols = np.nonzero(mask)
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
            assert a["area"] != mask.sum() == obj.area  # deliberately wrong, as in the release
    keys = {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences"}
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids) and len({r["ref_id"] for r in refs}) == len(refs)
    seen = []
    for ref in refs:
        assert set(ref) == keys
        scene, ann = scenes[ref["image_id"]], anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ref["category_id"] == ann["categories_id"]
        assert ref["split"] == scene.split and ref["file_name"] == images[ref["image_id"]]["file_name"]
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        target = [a["id"] for a in instances["annotations"] if a["image_id"] == ref["image_id"]].index(ann["id"])
        if target >= len(scene.objects):  # a no-target record: a ref to an empty annotation (area 0)
            (rle,) = ann["segmentation"]
            assert not _decode(rle).any() and ann["area"] == 0 and ann["bbox"] == [0, 0, 0, 0]
            (sentence,) = ref["sentences"]
            assert ann["categories_id"] == CATEGORIES.index(negative_category(sentence["sent"]))
            target = None
        for s in ref["sentences"]:
            assert set(s) == {"raw", "sent", "tokens", "sent_id"}
            assert s["sent"] == s["raw"].lower() and s["raw"][0].isupper() and s["tokens"] == s["sent"].split()
            assert scene.targets[scene.descriptions.index(s["sent"])] == target
            seen.append((ref["image_id"], s["sent"]))
    # Every record is a sentence, no-target ones included.
    expected = [(i, t) for i, s in enumerate(scenes) for t in s.descriptions]
    assert sorted(seen) == sorted(expected) and any(None in s.targets for s in scenes)


def test_rrsisd_polygons_names_shared_text_and_defects(tmp_path):
    scenes = _write(tmp_path, "rrsisd", polygons=True, shared_text_refs=2, defects=True, refer_name="nwpu",
                    refer_split_by="umd", refer_prefix="new_")
    with open(tmp_path / "nwpu" / "new_refs(umd).p", "rb") as f:
        refs = pickle.load(f)
    instances = json.loads((tmp_path / "nwpu" / "new_instances.json").read_text())
    own: Dict[int, list] = {}
    for a in instances["annotations"]:
        own.setdefault(a["image_id"], []).append(a)
    for i in range(NUM_IMAGES):
        _, masks, _, _ = _drawn(i)
        for a, mask in zip(own[i], masks):
            polygons = a["segmentation"]
            assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
            decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, SIZE, SIZE))).astype(bool)
            assert _iou(decoded, mask) > 0.8
    # Shared text: two refs of one image, two objects of one category, the same sentence, distinct sent_ids.
    by_text: Dict[Tuple[int, str], list] = {}
    for ref in refs:
        for s in ref["sentences"]:
            by_text.setdefault((ref["image_id"], s["sent"]), []).append((ref, s))
    shared = {k: v for k, v in by_text.items() if len(v) > 1}
    assert len(shared) == 2
    for (i, text), pair in shared.items():
        (ref_a, sa), (ref_b, sb) = pair
        assert re.fullmatch(r"(the two|two of the) [a-z ]+s", text)
        assert ref_a["ann_id"] != ref_b["ann_id"] and ref_a["category_id"] == ref_b["category_id"]
        assert (sa["raw"], sa["sent"]) == (sb["raw"], sb["sent"]) and sa["sent_id"] != sb["sent_id"]
        assert text not in scenes[i].descriptions
    # Defects: the first JPEGs are smaller than instances.json says; the masks keep the declared size.
    for image in instances["images"]:
        w, h = Image.open(tmp_path / "images" / "nwpu" / "JPEGImages" / image["file_name"]).size
        cut = DEFECT_CROPS[image["id"]] if image["id"] < len(DEFECT_CROPS) else (0, 0)
        assert (image["width"], image["height"]) == (SIZE, SIZE)
        assert (w, h) == (SIZE - cut[0], SIZE - cut[1])
        assert ((w, h) != (SIZE, SIZE)) == (image["id"] < 2)


def test_mask_polygons_are_exact_outlines():
    mask = np.zeros((12, 14), dtype=bool)
    mask[1:6, 1:7] = True
    mask[3, 3] = False  # a hole: dropped (COCO polygons carry none)
    mask[6, 7] = mask[7, 8] = True  # touching the block only at corners: separate loops
    mask[9:11, 2:12] = True
    polygons = mask_polygons(mask)
    assert len(polygons) == 4
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 12, 14))).astype(bool)
    filled = mask.copy()
    filled[3, 3] = True
    assert np.array_equal(decoded, filled)
    assert mask_polygons(np.zeros((5, 5), dtype=bool)) == []


# ------------------------------------------------------------------------------------------------ refsegrs, risbench


@pytest.mark.parametrize("fmt, image_dir, mask_dir, channels", [
    ("refsegrs", "images", "masks", 1), ("refsegrs", "images", "masks", 3), ("risbench", "img_rgb", "mask", 1),
])
def test_one_file_pair_per_expression(tmp_path, fmt, image_dir, mask_dir, channels):
    options = {"mask_channels": channels} if channels != 1 else {}
    scenes = _write(tmp_path, fmt, **options)
    lines, expected = _phrase_lines(tmp_path), _records_by_split(scenes)
    ext = ".tif" if fmt == "refsegrs" else ".png"
    ids = []
    for split in SPLITS:
        assert [text for _, text in lines[split]] == [text for _, _, text in expected[split]]
        for (key, _), (i, target, _) in zip(lines[split], expected[split]):
            stem = key if fmt == "refsegrs" else key[: -len(ext)]
            assert re.fullmatch(r"\d{5}", stem) and key == (stem if fmt == "refsegrs" else stem + ext)
            ids.append(stem)
            image, masks, _, _ = _drawn(i)
            picture = Image.open(tmp_path / image_dir / (stem + ext))
            assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), image)  # lossless
            mask = np.asarray(Image.open(tmp_path / mask_dir / (stem + ext)))
            assert mask.shape == ((SIZE, SIZE) if channels == 1 else (SIZE, SIZE, 3))
            assert set(np.unique(mask).tolist()) <= {0, 255}
            plane = mask if channels == 1 else mask[..., 0]
            truth = masks[target] if target is not None else np.zeros((SIZE, SIZE), dtype=bool)  # no target
            assert np.array_equal(plane > (50 if fmt == "refsegrs" else 0), truth)
    assert ids == [f"{k:05d}" for k in range(len(ids))]
    assert len(list((tmp_path / image_dir).iterdir())) == len(list((tmp_path / mask_dir).iterdir())) == len(ids)


# ------------------------------------------------------------------------------------------------ jsonl


def test_jsonl_manifest(tmp_path):
    scenes = _write(tmp_path, "jsonl")
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == sum(len(s.descriptions) for s in scenes)
    k = 0
    for i, scene in enumerate(scenes):
        _, masks, objs, _ = _drawn(i)
        for j, (text, target) in enumerate(zip(scene.descriptions, scene.targets)):
            line = lines[k]
            k += 1
            assert set(line) == {"image", "height", "width", "split", "text", "mask", "category", "source"}
            assert line["image"] == f"images/{scene.name}.jpg" and (tmp_path / line["image"]).is_file()
            assert (line["height"], line["width"], line["split"], line["text"]) == (SIZE, SIZE, scene.split, text)
            assert line["source"] == {"dataset": "synthetic", "id": f"{scene.name}:{j}"}
            if target is None:
                assert line["mask"] is None and line["category"] is None
            else:
                assert np.array_equal(_decode(line["mask"]), masks[target])
                assert line["category"] == objs[target].category
    assert any(line["mask"] is None for line in lines)


def test_cli_writes_the_chosen_format(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-images", "3", "--size", "64", "--format", "rrsisd", "--polygons",
          "--refer-name", "nwpu", "--refer-prefix", "new_", "--refer-split-by", "unc"])
    assert "as rrsisd" in capsys.readouterr().out
    assert (tmp_path / "nwpu" / "new_refs(unc).p").is_file() and (tmp_path / "nwpu" / "new_instances.json").is_file()
    main(["--out", str(tmp_path / "r"), "--num-images", "2", "--size", "64", "--format", "refsegrs",
          "--mask-channels", "3"])
    assert np.asarray(Image.open(tmp_path / "r" / "masks" / "00000.tif")).shape == (64, 64, 3)


# ------------------------------------------------------------------------------------------------ no-target records


@pytest.mark.parametrize("fmt", ["risors", "rrsisd", "refsegrs", "risbench", "jsonl"])
def test_training_sees_every_no_target_record(tmp_path, fmt):
    """--neg-ratio's records reach training in every format: the training dataset (keeping empty records, as the
    generator says to for risors / rrsisd) yields one expression with an empty ground truth per no-target record
    of the split, with its text; the loss learns "no target" from an empty mask (rsam/losses.py)."""
    from rsam.data.dataset import ReferringDataset

    scenes = generate(str(tmp_path / fmt), 8, 64, SEED, neg_ratio=1.5, format=fmt, val_fraction=0.0,
                      test_fraction=0.0)
    wanted = sorted(t for s in scenes for t, k in zip(s.descriptions, s.targets) if k is None)
    assert len(wanted) >= 4
    dataset = ReferringDataset(str(tmp_path / fmt), "train", training=True, resolution=64, format=fmt,
                               max_expressions_per_image=None, empty_annotations="negative")
    seen = []
    for i in range(len(dataset)):
        sample = dataset[(i, 0)]
        for text, mask, negative in zip(sample.descriptions, sample.masks, sample.is_negative):
            if not mask.any():
                seen.append(text)
                # jsonl, risors and rrsisd store the record as empty; the phrase formats as an all-zero mask file
                assert negative or fmt in ("refsegrs", "risbench"), text
    assert sorted(t.lower() for t in seen) == wanted  # rrsisd keeps the capitalised "raw" text
