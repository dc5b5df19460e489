"""Synthetic referring-segmentation datasets: procedurally drawn aerial-like scenes with referring expressions.

    python -m rsam.data.synthetic --out data/demo --num-images 600 --size 256 --seed 0 [--neg-ratio 0.5]
        [--format {risors,rrsisd,refsegrs,risbench,jsonl}]

draws the scenes once and writes them in one public release format (:mod:`rsam.data.synthetic.formats`), so every
reader can be tested offline; every format also gets ``vocab.txt``, a small WordPiece vocabulary of the grammar
for a tiny text encoder. Formats (paths relative to ``--out``):

    risors    (default) ``JPEGImages/<name>.jpg``, ``Annotations/<name>.json`` (COCO RLE ``segmentation``,
              ``area``, ``description``, ``name``) and ``RISORS_{train,val,test}.txt`` -- what
              :mod:`rsam.data.readers.risors` reads.
    rrsisd    REFER style, the RMSIN release of RRSIS-D: ``rrsisd/refs(unc).p`` (pickled list of refs with
              sentences), ``rrsisd/instances.json`` (COCO-like; RLE list or, with ``--polygons``, outline polygons;
              ``categories_id`` (sic), 0-based categories, a deliberately wrong ``area``), JPEGs in
              ``images/rrsisd/JPEGImages/``. ``--refer-name``/``--refer-split-by``/``--refer-prefix`` change the
              names (NWPU-Refer: prefix ``new_``); ``--shared-text-refs N`` gives N images two refs with one
              multi-object sentence; ``--defects`` saves the first two JPEGs a few pixels smaller than declared.
    refsegrs  ``images/<id>.tif``, ``masks/<id>.tif`` (0/255; ``--mask-channels 3`` for RGB masks) and
              ``output_phrase_{train,val,test}.txt`` lines ``<id> <expression>``: one image copy per expression.
    risbench  ``img_rgb/<id>.png``, ``mask/<id>.png`` (0/255) and ``output_phrase_{split}.txt`` lines
              ``<id>.png <expression>``: one image copy per expression.
    jsonl     our custom-data format: ``images/<name>.jpg`` and ``manifest.jsonl``, one JSON object per expression
              (image, height, width, split, text, RLE mask or null, category, source).

No-target records (``--neg-ratio``) are written in the form each format's reader keeps: jsonl ``mask: null``
(always kept, flagged no-target); refsegrs and risbench an all-zero mask file (always kept; its empty ground
truth trains "no target"); risors an empty RLE with ``area`` 0 and rrsisd a ref to an empty annotation, which
their readers drop by the official ``area <= 0`` rule unless the dataset keeps them
(``data.<split>.dataset.empty_annotations: negative``; on the command line ``+data.train.dataset.
empty_annotations=negative``, a key the configs do not set; see ``rsam.data.dataset.ReferringDataset``).

Scenes: textured ground with field patches and roads; 3-6 non-overlapping objects (storage tanks, airplanes,
vehicles, buildings, ships) in five colours, with random sizes (a fraction of the image side), orientations and
cast shadows. Categories repeat within an image on purpose, so the expression -- not the picture alone -- decides
which object is meant. Expressions come from a few templates over a small vocabulary:

    category      "the ship"                      colour        "the red ship"
    region        "the ship at the top left"      superlative   "the largest white building"
    ordinal       "the second vehicle from the left"
    relation      "the airplane left of the white storage tank"

Every expression is checked to single out its object among *all* objects of the image, with safety margins on
positions and sizes so that no expression is borderline; :func:`resolve` parses an expression back and evaluates
it on the scene (used by the tests). With ``neg_ratio > 0`` each image also gets ``k ~ Poisson(neg_ratio)``
no-target records (an absent category or colour/category pair) with an empty mask, in each format's form (above).

Everything is drawn with vectorised numpy on the object's own patch; one generator per (seed, image index) makes
the output deterministic and independent of ``num_images`` for the images they share.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from rsam.data.synthetic.formats import FORMATS, DrawnImage, FormatOptions, check_options
from rsam.data.synthetic.language import candidate_expressions, negative_candidates, resolve
from rsam.data.synthetic.scene import (CATEGORIES, COLOURS, DIRECTIONS, KIND_WEIGHTS, ORDINALS, REGIONS, RELATIONS,
                                       SceneObject, SceneRecord, layout, render)

__all__ = ["generate", "make_scene", "resolve", "write_vocab", "grammar_words", "SceneObject", "SceneRecord",
           "CATEGORIES", "COLOURS", "FORMATS", "main"]


def _split_of(i: int, n: int, val_fraction: float, test_fraction: float) -> str:
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test, n_val = max(n_test, 1 if test_fraction > 0 else 0), max(n_val, 1 if val_fraction > 0 else 0)
    n_train = n - n_val - n_test
    return "train" if i < n_train else ("val" if i < n_train + n_val else "test")


def make_scene(
    rng: np.random.Generator,
    size: int,
    min_objects: int = 3,
    max_objects: int = 6,
    min_object_frac: float = 0.15,
    max_object_frac: float = 0.3,
    expressions_per_object: int = 1,
    neg_ratio: float = 0.0,
) -> Tuple[np.ndarray, List[np.ndarray], List[SceneObject], List[Tuple[str, Optional[int], str]]]:
    """One scene -> image (S,S,3) uint8, masks, objects, [(description, target or None, kind)]."""
    for _ in range(20):
        n = int(rng.integers(min_objects, max_objects + 1))
        specs = layout(rng, size, n, min_object_frac, max_object_frac)
        if len(specs) < min(min_objects, 2):
            continue
        image, masks = render(rng, size, specs)
        objs = []
        centres = np.arange(size) + 0.5
        for s, m in zip(specs, masks):
            area = int(m.sum())
            cx = float(m.sum(0) @ centres) / (area * size)
            cy = float(m.sum(1) @ centres) / (area * size)
            objs.append(SceneObject(s["category"], s["colour"], cx, cy, area, float(s["angle"]), float(s["length"])))
        records: List[Tuple[str, Optional[int], str]] = []
        used = set()
        for t in range(len(objs)):
            cands = candidate_expressions(t, objs)
            for _ in range(expressions_per_object):
                kinds = [k for k, texts in cands.items() if any(x not in used for x in texts)]
                if not kinds:
                    break
                weights = np.asarray([KIND_WEIGHTS[k] for k in kinds])
                kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
                texts = [x for x in cands[kind] if x not in used]
                text = texts[int(rng.integers(len(texts)))]
                used.add(text)
                records.append((text, t, kind))
        if not records:
            continue
        negs = negative_candidates(objs)
        k = min(int(rng.poisson(neg_ratio)), len(negs)) if neg_ratio > 0 else 0
        for j in rng.choice(len(negs), size=k, replace=False) if k else []:
            records.append((negs[int(j)][0], None, "negative"))
        return image, masks, objs, records
    raise RuntimeError(f"could not lay out a scene of {min_objects}-{max_objects} objects at {size} px")


def generate(
    out_dir: str,
    num_images: int,
    size: int = 256,
    seed: int = 0,
    neg_ratio: float = 0.0,
    min_objects: int = 3,
    max_objects: int = 6,
    min_object_frac: float = 0.15,
    max_object_frac: float = 0.3,
    expressions_per_object: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    jpeg_quality: int = 92,
    prefix: str = "synthetic",
    write_vocabulary: bool = True,
    format: str = "risors",
    refer_name: str = "rrsisd",
    refer_split_by: str = "unc",
    refer_prefix: str = "",
    polygons: bool = False,
    shared_text_refs: int = 0,
    defects: bool = False,
    mask_channels: int = 1,
) -> List[SceneRecord]:
    """Write a synthetic dataset in ``format`` (a key of :data:`FORMATS`) to ``out_dir``; return what was drawn.

    The scenes, splits and records do not depend on the format. ``refer_*``, ``polygons``, ``shared_text_refs``
    and ``defects`` apply to "rrsisd", ``mask_channels`` to "refsegrs" (see :class:`FormatOptions`).
    ``write_vocabulary`` adds ``<out_dir>/vocab.txt``: a ~130-entry WordPiece vocabulary covering the grammar,
    for a tiny BERT trained from scratch (see :func:`write_vocab`).
    """
    if num_images < 1 or size < 32:
        raise ValueError(f"need num_images >= 1 and size >= 32, got {num_images}, {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    options = FormatOptions(jpeg_quality, refer_name, refer_split_by, refer_prefix, polygons, shared_text_refs,
                            defects, mask_channels)
    check_options(format, options)
    scenes: List[SceneRecord] = []

    def draw() -> Iterator[DrawnImage]:
        # A generator, so that only one scene's pixels are in memory at a time whatever the format.
        for i in range(num_images):
            rng = np.random.default_rng([seed, i])
            image, masks, objs, records = make_scene(
                rng, size, min_objects, max_objects, min_object_frac, max_object_frac, expressions_per_object,
                neg_ratio,
            )
            name = f"{prefix}_{i:06d}"
            split = _split_of(i, num_images, val_fraction, test_fraction)
            scenes.append(
                SceneRecord(name, split, objs, [r[0] for r in records], [r[1] for r in records],
                            [r[2] for r in records])
            )
            yield DrawnImage(i, name, split, image, masks, objs, records)

    os.makedirs(out_dir, exist_ok=True)
    FORMATS[format](out_dir, draw(), options)
    if write_vocabulary:
        write_vocab(os.path.join(out_dir, "vocab.txt"))
    return scenes


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def grammar_words() -> List[str]:
    """Every word the expression templates can produce, sorted."""
    phrases = [*CATEGORIES, *COLOURS, *REGIONS.values(), *ORDINALS, *DIRECTIONS, *RELATIONS]
    phrases += ["the largest smallest from"]
    return sorted({w for p in phrases for w in p.split()})


def write_vocab(path: str) -> None:
    """A small BERT WordPiece vocabulary for a tiny text encoder trained from scratch on this grammar.

    Special tokens, the grammar's words, then single characters (and their ``##`` continuations) so that any
    other text still tokenises into known pieces instead of [UNK].
    """
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"()-/#&")
    tokens = list(SPECIAL_TOKENS) + grammar_words()
    tokens += [c for c in chars if c not in tokens] + [f"##{c}" for c in chars if c.isalnum()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{t}\n" for t in tokens))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic referring segmentation dataset in a release format.")
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--num-images", type=int, default=600)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neg-ratio", type=float, default=0.0,
                   help="mean no-target records per image (risors / rrsisd: train with "
                        "+data.train.dataset.empty_annotations=negative)")
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--min-object-frac", type=float, default=0.15, help="smallest object extent / image side")
    p.add_argument("--max-object-frac", type=float, default=0.3, help="largest object extent / image side")
    p.add_argument("--expressions-per-object", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--format", choices=list(FORMATS), default="risors", help="release layout to write")
    p.add_argument("--polygons", action="store_true", help="rrsisd: outline polygons instead of RLEs")
    p.add_argument("--shared-text-refs", type=int, default=0, metavar="N",
                   help="rrsisd: N images get two same-category refs sharing one sentence")
    p.add_argument("--defects", action="store_true", help="rrsisd: first two JPEGs smaller than instances.json says")
    p.add_argument("--refer-name", default="rrsisd", help="rrsisd: dataset folder name")
    p.add_argument("--refer-split-by", default="unc", help="rrsisd: refs(<split-by>).p")
    p.add_argument("--refer-prefix", default="", help="rrsisd: file name prefix (NWPU-Refer: new_)")
    p.add_argument("--mask-channels", type=int, choices=(1, 3), default=1, help="refsegrs: mask TIFF channels")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        scenes = generate(
            args.out,
            args.num_images,
            args.size,
            args.seed,
            neg_ratio=args.neg_ratio,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            min_object_frac=args.min_object_frac,
            max_object_frac=args.max_object_frac,
            expressions_per_object=args.expressions_per_object,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            format=args.format,
            refer_name=args.refer_name,
            refer_split_by=args.refer_split_by,
            refer_prefix=args.refer_prefix,
            polygons=args.polygons,
            shared_text_refs=args.shared_text_refs,
            defects=args.defects,
            mask_channels=args.mask_channels,
        )
    except ValueError as e:  # an option that does not fit the format
        p.error(str(e))
    n_expr = sum(len(s.descriptions) for s in scenes)
    counts = {k: sum(s.split == k for s in scenes) for k in ("train", "val", "test")}
    print(
        f"wrote {len(scenes)} images ({counts}) with {n_expr} expressions as {args.format} to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    n_neg = sum(t is None for s in scenes for t in s.targets)
    if n_neg and args.format in ("risors", "rrsisd"):
        print(f"{n_neg} no-target records have area 0: the {args.format} reader skips them (official rule) unless "
              "the dataset keeps them: +data.train.dataset.empty_annotations=negative")


if __name__ == "__main__":
    main()