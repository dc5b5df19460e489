"""RISORS reader, dataset, samplers and loader builders.

On-disk layout (any iopath URI works as ``root``)::

    <root>/JPEGImages/<name>.jpg
    <root>/Annotations/<name>.json      {"annotations": [{"segmentation": {"size": [h, w], "counts": ...},
                                                         "area": float, "description": str, "name": str}, ...]}
    <root>/RISORS_{train,val,test}.txt  one image name per line (whitespace and extension stripped)

One annotation record = one referring expression = one (expression, mask) pair. Records with ``area <= 0`` are
skipped, as in the official reader (and counted, see ``bad_sample_counts``), unless ``empty_annotations="negative"``
turns them into in-image no-target expressions.

No-target ("negative") expressions, as the paper describes and the official code fails to do (spec bug B1): for
each image draw ``k ~ Poisson(negative_ratio)`` expressions, uniformly without replacement, among the split's
expressions whose category does not occur in this image, and pair each with an empty mask. Randomness:

* training: one ``numpy`` generator per (seed, epoch, image index) -- the same draws whatever the number of
  ranks or workers, and a run resumed mid-epoch redraws exactly what it would have drawn (the official RNG was
  copied into every worker);
* evaluation: one generator per (seed, image index) -- the same negatives whatever the number of ranks/workers.

Bad input raises :class:`DataError` naming the file and the problem. With ``skip_bad_samples=True`` the record
or image is skipped instead, with a warning (once per file and problem per process) and a counter that
``bad_sample_counts()`` reports across all dataloader workers (shared-memory tensor, one row per worker).
"""
from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from iopath.common.file_io import PathManager, g_pathmgr
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from rsam.data.batch import ImageSample
from rsam.data.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Counter slots. All but "zero_area" are bad input; "zero_area" counts records skipped by the format rule.
COUNT_KEYS = ("missing_file", "image", "json", "field", "size", "description", "no_annotations", "zero_area")
_MAX_COUNTER_ROWS = 257  # row 0: main process, row w + 1: dataloader worker w
_KNOWN_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".json")


class DataError(ValueError):
    """Bad dataset input. ``str(err)`` is ``"<file>: <problem>"``; ``reason`` is one of ``COUNT_KEYS``."""

    def __init__(self, path: str, problem: str, reason: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.reason = path, problem, reason

    def __reduce__(self):  # picklable across processes despite the 3-argument constructor
        return (DataError, (self.path, self.problem, self.reason))


@dataclass(frozen=True)
class Annotation:
    """One validated annotation record (mask still RLE-encoded)."""

    index: int  # position in the file's "annotations" list
    description: str
    category: str
    area: float
    segmentation: dict  # {"size": [h, w], "counts": bytes | list[int]}

    @property
    def empty(self) -> bool:
        return self.area <= 0


def _strip_name(line: str) -> str:
    name = line.strip()
    root, ext = os.path.splitext(name)
    return root if ext.lower() in _KNOWN_EXTENSIONS else name


def _parse_record(rec, index: int, path: str) -> Annotation:
    """Validate one JSON record; raises DataError naming the field."""
    where = f"annotations[{index}]"
    if not isinstance(rec, dict):
        raise DataError(path, f"{where} is a {type(rec).__name__}, expected an object", "field")
    for key in ("segmentation", "area", "description", "name"):
        if key not in rec:
            raise DataError(path, f"{where} has no '{key}' field", "field")
    seg = rec["segmentation"]
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise DataError(path, f"{where}.segmentation must be a COCO RLE object with 'size' and 'counts'", "field")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise DataError(path, f"{where}.segmentation.size must be [h, w] positive integers, got {size!r}", "field")
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    elif not isinstance(counts, (bytes, list)):
        raise DataError(path, f"{where}.segmentation.counts must be a string, bytes or a list", "field")
    area = rec["area"]
    if isinstance(area, bool) or not isinstance(area, (int, float)):
        raise DataError(path, f"{where}.area must be a number, got {area!r}", "field")
    desc, cat = rec["description"], rec["name"]
    if not isinstance(desc, str):
        raise DataError(path, f"{where}.description must be a string, got {type(desc).__name__}", "field")
    if not desc.strip():
        raise DataError(path, f"{where}.description is empty", "description")
    if not isinstance(cat, str) or not cat.strip():
        raise DataError(path, f"{where}.name (category) must be a non-empty string, got {cat!r}", "field")
    return Annotation(index, desc, cat, float(area), {"size": [size[0], size[1]], "counts": counts})


def _raise(err: DataError) -> None:
    raise err


class RISORSReader:
    """File access and parsing for one RISORS split (no randomness, no transforms).

    Args:
        root: dataset root (local path or iopath URI).
        split: ``"train"``, ``"val"``, ``"test"`` (reads ``RISORS_<split>.txt``) or ``None`` (every ``*.jpg``).
        file_list: explicit split list, overrides ``split``.
        path_manager: iopath ``PathManager`` (default: the global one).
    """

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        file_list: Optional[str] = None,
        path_manager: Optional[PathManager] = None,
    ):
        self.root = root.rstrip("/")
        self.pm = path_manager or g_pathmgr
        if file_list is None and split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
            file_list = self.join(f"RISORS_{split}.txt")
        self.file_list = file_list
        self.names = self.read_file_list(file_list) if file_list is not None else self.list_images()

    def __getstate__(self) -> dict:
        # The global PathManager is re-attached on unpickling (spawned dataloader workers).
        state = dict(self.__dict__)
        if state["pm"] is g_pathmgr:
            state["pm"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.pm is None:
            self.pm = g_pathmgr

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def image_path(self, name: str) -> str:
        return self.join("JPEGImages", f"{name}.jpg")

    def annotation_path(self, name: str) -> str:
        return self.join("Annotations", f"{name}.json")

    def read_file_list(self, path: str) -> List[str]:
        if not self.pm.exists(path):
            raise FileNotFoundError(f"{path}: split list not found")
        with self.pm.open(path, "r") as f:
            names = [_strip_name(line) for line in f]
        names = [n for n in names if n]
        if not names:
            raise DataError(path, "split list is empty", "missing_file")
        return names

    def list_images(self) -> List[str]:
        folder = self.join("JPEGImages")
        if not self.pm.isdir(folder):
            raise FileNotFoundError(f"{folder}: image folder not found")
        return sorted(os.path.splitext(f)[0] for f in self.pm.ls(folder) if f.lower().endswith(".jpg"))

    def missing_files(self, names: Sequence[str]) -> List[Tuple[str, str]]:
        """(name, path) of every image or annotation file that does not exist."""

        def check(name: str) -> List[Tuple[str, str]]:
            return [(name, p) for p in (self.image_path(name), self.annotation_path(name)) if not self.pm.exists(p)]

        with ThreadPoolExecutor(8) as pool:
            return [m for ms in pool.map(check, names) for m in ms]

    def _read_bytes(self, path: str, kind: str) -> bytes:
        try:
            with self.pm.open(path, "rb") as f:
                return f.read()
        except OSError as e:  # FileNotFoundError included
            raise DataError(path, f"cannot read {kind} file ({e})", "missing_file") from None

    def size_mismatch(self, name: str, ann: Annotation, size: Tuple[int, int]) -> Optional[DataError]:
        """The error for an annotation whose RLE size differs from the image's (h, w), or None if they agree."""
        if ann.segmentation["size"] == list(size):
            return None
        return DataError(
            self.annotation_path(name),
            f"annotations[{ann.index}].segmentation.size {ann.segmentation['size']} != image size "
            f"{list(size)} of {self.image_path(name)}",
            "size",
        )

    def load_annotations(
        self,
        name: str,
        on_bad_record: Callable[[DataError], None] = _raise,
        keep_empty: bool = False,
        on_zero_area: Optional[Callable[[], None]] = None,
    ) -> List[Annotation]:
        """Parse ``Annotations/<name>.json``.

        File-level problems raise :class:`DataError`; a bad record goes to ``on_bad_record`` (raise by default,
        or record-and-skip). Records with ``area <= 0`` are dropped (``on_zero_area`` called for each) unless
        ``keep_empty``.
        """
        path = self.annotation_path(name)
        raw = self._read_bytes(path, "annotation")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(path, f"malformed JSON ({e})", "json") from None
        if not isinstance(data, dict) or "annotations" not in data:
            raise DataError(path, "no top-level 'annotations' field", "field")
        records = data["annotations"]
        if not isinstance(records, list):
            raise DataError(path, "'annotations' must be a list", "field")
        out = []
        for i, rec in enumerate(records):
            try:
                ann = _parse_record(rec, i, path)
            except DataError as e:
                on_bad_record(e)
                continue
            if ann.empty and not keep_empty:
                if on_zero_area is not None:
                    on_zero_area()
                continue
            out.append(ann)
        return out

    def open_image(self, name: str) -> Image.Image:
        """Open the image lazily (header only): ``.size`` is known, pixels are decoded by :meth:`decode_image`."""
        path = self.image_path(name)
        raw = self._read_bytes(path, "image")
        try:
            return Image.open(io.BytesIO(raw))
        except Exception as e:  # PIL raises several types for unknown/corrupt headers
            raise DataError(path, f"unreadable image ({type(e).__name__}: {e})", "image") from None

    def decode_image(self, name: str, image: Image.Image, draft_size: Optional[int] = None) -> Image.Image:
        """Decode pixels to RGB. ``draft_size`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the network
        resolution is that much smaller than the file (a large saving at demo resolutions, none at 800 px)."""
        try:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
        except Exception as e:
            raise DataError(self.image_path(name), f"corrupt image data ({type(e).__name__}: {e})", "image") from None

    def decode_masks(self, name: str, annotations: Sequence[Annotation]) -> np.ndarray:
        """Decode the RLEs of ``annotations`` (all of one image size) -> bool (k,H,W), C-contiguous."""
        if not annotations:
            raise ValueError("decode_masks needs at least one annotation")
        h, w = annotations[0].segmentation["size"]
        out = np.zeros((len(annotations), h, w), dtype=bool)
        long_rles = []
        for i, ann in enumerate(annotations):
            seg = ann.segmentation
            if seg["size"] != [h, w]:
                raise DataError(
                    self.annotation_path(name),
                    f"annotations[{ann.index}].segmentation.size {seg['size']} != {[h, w]} "
                    f"(annotations[{annotations[0].index}].segmentation.size)",
                    "size",
                )
            counts = seg["counts"]
            if not isinstance(counts, list) and len(counts) > FAST_RLE_MAX_CHARS:
                long_rles.append(i)
                continue
            try:
                fill_rle(rle_counts(counts) if isinstance(counts, bytes) else counts, out[i])
            except (ValueError, IndexError) as e:
                raise DataError(
                    self.annotation_path(name), f"annotations[{ann.index}].segmentation: invalid RLE ({e})", "field"
                ) from None
        if long_rles:
            try:
                decoded = mask_utils.decode([annotations[i].segmentation for i in long_rles])
            except Exception as e:
                raise DataError(
                    self.annotation_path(name), f"segmentation of annotations {[annotations[i].index for i in long_rles]}: "
                    f"invalid RLE ({e})", "field"
                ) from None
            out[long_rles] = decoded.transpose(2, 0, 1).view(bool)  # column-major (H,W,k) bytes
        return out


# Compressed RLE strings up to this length are decoded by rle_counts + fill_rle (a few hundred column slices for
# a typical object, ~3x faster than pycocotools' byte loop plus the transpose its column-major output needs);
# longer ones (very fragmented masks) go to pycocotools, whose cost does not grow with the number of runs.
FAST_RLE_MAX_CHARS = 1500


def rle_counts(counts: bytes) -> List[int]:
    """Run lengths of a compressed COCO RLE string (column-major, starting with a background run).

    The COCO code: 5 data bits per character (offset 48), 0x20 = another character follows, 0x10 in the last
    character = negative; from the third run on, each value is stored as the difference to the run two before.
    """
    runs: List[int] = []
    p, n = 0, len(counts)
    while p < n:
        x = k = 0
        while True:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def fill_rle(runs: Sequence[int], out: np.ndarray) -> None:
    """Paint column-major run lengths into a row-major bool mask ``out`` (H,W) that is all False.

    Every foreground run is cut at column boundaries into vertical segments, each written as one slice.
    """
    h, w = out.shape
    lengths = np.asarray(runs, dtype=np.int64)
    if (lengths < 0).any() or int(lengths.sum()) != h * w:
        raise ValueError(f"run lengths sum to {int(lengths.sum())} (negative: {bool((lengths < 0).any())}) for a {h}x{w} mask")
    ends = np.cumsum(lengths)
    start, end = (ends - lengths)[1::2], ends[1::2]  # foreground runs: [start, end) in column-major order
    nonempty = end > start
    start, end = start[nonempty], end[nonempty]
    first_col, last_col = start // h, (end - 1) // h
    pieces = last_col - first_col + 1
    run = np.repeat(np.arange(len(start)), pieces)
    offset = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    col = first_col[run] + offset
    row0 = np.where(offset == 0, start[run] - col * h, 0)
    row1 = np.where(col == last_col[run], end[run] - col * h, h)
    for c, r0, r1 in zip(col.tolist(), row0.tolist(), row1.tolist()):
        out[r0:r1, c] = True


def _default_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _worker_id() -> int:
    info = get_worker_info()
    return -1 if info is None else info.id


class RISORSDataset(Dataset):
    """Per-image RISORS samples (:class:`rsam.data.batch.ImageSample`) for training or evaluation.

    Args:
        root, split, file_list, path_manager: see :class:`RISORSReader`.
        transform: ``(image, masks, descriptions, rng) -> (image, masks, descriptions)``; default
            ``TrainTransform(resolution)`` when training, ``EvalTransform(resolution)`` otherwise.
        training: random subsampling of expressions (up to ``max_expressions_per_image``) and retry-on-bad-sample;
            default: ``split == "train"``. Evaluation returns every expression of the image.
        resolution: network resolution R used for the default transform and JPEG draft decoding.
        max_expressions_per_image: training cap on the image's own expressions (official 4); negatives come on top.
        negative_ratio: mean number of no-target expressions per image (Poisson); 0 = official behaviour.
        seed: base seed of every random choice of the dataset.
        rank: distributed rank (default: the process group's rank, else 0); informational -- training draws are
            seeded per (seed, epoch, image index), the same on every rank and worker.
        skip_bad_samples: skip and count bad records/images instead of raising.
        empty_annotations: ``"skip"`` (official: drop records with area <= 0) or ``"negative"`` (keep them as
            in-image no-target expressions with an empty mask).
        jpeg_draft: decode JPEGs at a reduced scale when R is at most half the image side.
        check_files: verify at construction that every listed image and annotation file exists.
        max_retries: training only, with ``skip_bad_samples``: how many replacement images to try.
    """

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        transform: Optional[Callable] = None,
        training: Optional[bool] = None,
        resolution: int = 800,
        max_expressions_per_image: Optional[int] = 4,
        negative_ratio: float = 0.0,
        seed: int = 0,
        rank: Optional[int] = None,
        skip_bad_samples: bool = False,
        empty_annotations: str = "skip",
        file_list: Optional[str] = None,
        jpeg_draft: bool = True,
        check_files: bool = True,
        max_retries: int = 10,
        path_manager: Optional[PathManager] = None,
    ):
        if empty_annotations not in ("skip", "negative"):
            raise ValueError(f"empty_annotations must be 'skip' or 'negative', got {empty_annotations!r}")
        if negative_ratio < 0:
            raise ValueError(f"negative_ratio must be >= 0, got {negative_ratio}")
        if max_expressions_per_image is not None and max_expressions_per_image < 1:
            raise ValueError(f"max_expressions_per_image must be >= 1 or None, got {max_expressions_per_image}")
        self.reader = RISORSReader(root, split, file_list, path_manager)
        self.training = (split == "train") if training is None else bool(training)
        if transform is None:
            # uint8 out: the collate normalises straight into the batch tensor.
            transform = (
                TrainTransform(resolution, normalize=False) if self.training else EvalTransform(resolution, normalize=False)
            )
        self.transform = transform
        self.resolution = int(getattr(transform, "resolution", resolution))
        self.max_expressions_per_image = max_expressions_per_image
        self.negative_ratio = float(negative_ratio)
        self.seed = int(seed)
        self.rank = _default_rank() if rank is None else int(rank)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.keep_empty = empty_annotations == "negative"
        self.jpeg_draft = bool(jpeg_draft)
        self.max_retries = int(max_retries)
        self.epoch = 0
        # Shared memory so that increments made in dataloader workers are visible to the main process.
        self._counts = torch.zeros((_MAX_COUNTER_ROWS, len(COUNT_KEYS)), dtype=torch.int64).share_memory_()
        self._warned: set = set()

        self.names: List[str] = list(self.reader.names)
        if check_files:
            self._drop_missing_files()
        self._build_negative_index()

    # ----------------------------------------------------------------------------------------------- bookkeeping
    @property
    def root(self) -> str:
        return self.reader.root

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        """Epoch for integer indices (the train sampler passes ``(index, epoch)`` pairs instead, which also works
        with persistent workers that never see this attribute change)."""
        self.epoch = int(epoch)

    def _count(self, reason: str) -> None:
        self._counts[_worker_id() + 1, COUNT_KEYS.index(reason)] += 1

    def _handle_bad(self, err: DataError) -> None:
        """Raise, or (skip_bad_samples) warn once per file and problem and count."""
        if not self.skip_bad_samples:
            raise err
        self._count(err.reason)
        if (err.path, err.problem) not in self._warned:
            self._warned.add((err.path, err.problem))
            log.warning("skipping bad sample: %s", err)

    def bad_sample_counts(self) -> Dict[str, int]:
        """Counts per problem since the last reset, summed over the main process and all dataloader workers.

        Keys: ``COUNT_KEYS``; ``zero_area`` counts records skipped because ``area <= 0`` (the format rule), the
        others bad input skipped with ``skip_bad_samples``. In a distributed run each rank counts its own share.
        """
        totals = self._counts.sum(0).tolist()
        return dict(zip(COUNT_KEYS, totals))

    def reset_bad_sample_counts(self) -> None:
        self._counts.zero_()

    def report_bad_samples(self, logger: logging.Logger = log, prefix: str = "") -> Dict[str, int]:
        """Log the counts (warning if any bad input was skipped) and return them; call at the end of an epoch."""
        counts = self.bad_sample_counts()
        bad = {k: v for k, v in counts.items() if v and k != "zero_area"}
        if bad:
            logger.warning("%sskipped bad samples in %s: %s", prefix, self.root, bad)
        if counts["zero_area"]:
            logger.info("%s%d records with area <= 0 skipped (format rule)", prefix, counts["zero_area"])
        return counts

    def _drop_missing_files(self) -> None:
        missing = self.reader.missing_files(self.names)
        if not missing:
            return
        where = self.reader.file_list or self.reader.join("JPEGImages")
        if not self.skip_bad_samples:
            shown = ", ".join(p for _, p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(where, f"names {len(missing)} missing file(s): {shown}{more}", "missing_file")
        bad = {n for n, _ in missing}
        for _, path in missing:
            self._handle_bad(DataError(where, f"lists a missing file {path}", "missing_file"))
        self.names = [n for n in self.names if n not in bad]
        if not self.names:
            raise DataError(where, "no image left after dropping missing files", "missing_file")

    # ----------------------------------------------------------------------------------------------- negatives
    def _build_negative_index(self) -> None:
        """Index (description, category) of every expression of the split, grouped by category."""
        self._neg_descriptions: List[str] = []
        self._neg_categories: List[str] = []
        self._neg_by_category: Dict[str, np.ndarray] = {}
        if self.negative_ratio <= 0:
            return

        def ignore(_: DataError) -> None:  # counted when the image itself is loaded
            pass

        def load(name: str) -> List[Annotation]:
            try:
                return self.reader.load_annotations(name, ignore if self.skip_bad_samples else _raise)
            except DataError:
                if not self.skip_bad_samples:
                    raise
                return []

        with ThreadPoolExecutor(8) as pool:
            per_image = list(pool.map(load, self.names))
        groups: Dict[str, List[int]] = {}
        for anns in per_image:
            for ann in anns:
                groups.setdefault(ann.category, []).append(len(self._neg_descriptions))
                self._neg_descriptions.append(ann.description)
                self._neg_categories.append(ann.category)
        self._neg_by_category = {c: np.asarray(v, dtype=np.int64) for c, v in sorted(groups.items())}

    def sample_negatives(self, present: set, rng: np.random.Generator) -> List[int]:
        """Indices into the negative index: k ~ Poisson(ratio), drawn without replacement among the expressions
        whose category is absent from the image (hence never from the image itself)."""
        if self.negative_ratio <= 0:
            return []
        k = int(rng.poisson(self.negative_ratio))
        if k == 0:
            return []
        pools = [idx for c, idx in self._neg_by_category.items() if c not in present]
        total = sum(len(p) for p in pools)
        if total == 0:
            return []
        flat = np.concatenate(pools)
        return flat[rng.choice(total, size=min(k, total), replace=False)].tolist()

    # ----------------------------------------------------------------------------------------------- loading
    def _train_rng(self, epoch: int, index: int) -> np.random.Generator:
        # Per sample, not per worker stream: resumable mid-epoch and independent of the worker count.
        return np.random.default_rng([self.seed, epoch, index, 1])

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Optional[ImageSample]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        if not self.training:
            rng = np.random.default_rng([self.seed, index])
            try:
                return self.load(index, rng, epoch)
            except DataError as e:
                self._handle_bad(e)
                return None
        rng = self._train_rng(epoch, index)
        for _ in range(self.max_retries + 1):
            try:
                return self.load(index, rng, epoch)
            except DataError as e:
                self._handle_bad(e)
                index = int(rng.integers(len(self)))  # like the official loader: try another image
        raise RuntimeError(f"{self.root}: {self.max_retries + 1} bad samples in a row, giving up")

    def load(self, index: int, rng: np.random.Generator, epoch: int = 0) -> ImageSample:
        """Read, select, decode and transform one image. Raises :class:`DataError` for an unusable image."""
        name = self.names[index]
        reader = self.reader
        anns = reader.load_annotations(
            name, self._handle_bad, keep_empty=self.keep_empty, on_zero_area=partial(self._count, "zero_area")
        )
        image = reader.open_image(name)
        h, w = image.height, image.width
        valid = []
        for ann in anns:
            err = reader.size_mismatch(name, ann, (h, w))
            if err is not None:
                self._handle_bad(err)
                continue
            valid.append(ann)
        if not valid:
            raise DataError(reader.annotation_path(name), "no usable annotation", "no_annotations")

        selected = valid
        if self.training and self.max_expressions_per_image is not None and len(valid) > self.max_expressions_per_image:
            pick = np.sort(rng.choice(len(valid), size=self.max_expressions_per_image, replace=False))
            selected = [valid[i] for i in pick]
        negatives = self.sample_negatives({a.category for a in valid if not a.empty}, rng)

        positives = [a for a in selected if not a.empty]
        masks = reader.decode_masks(name, positives) if positives else np.zeros((0, h, w), bool)
        draft = self.resolution if self.jpeg_draft else None
        pixels = reader.decode_image(name, image, draft)
        descriptions = [a.description for a in selected] + [self._neg_descriptions[j] for j in negatives]
        image_t, masks_t, descriptions = self.transform(pixels, masks, descriptions, rng)

        r = image_t.shape[-1]
        if len(positives) == len(selected):  # the common case: no in-image empty record, no scatter needed
            all_masks = masks_t
            if negatives:
                all_masks = torch.cat([masks_t, torch.zeros((len(negatives), r, r), dtype=torch.bool)])
        else:
            all_masks = torch.zeros((len(descriptions), r, r), dtype=torch.bool)
            rows = [i for i, a in enumerate(selected) if not a.empty]
            if rows:
                all_masks[rows] = masks_t
        return ImageSample(
            name=name,
            image=image_t,
            masks=all_masks,
            descriptions=descriptions,
            categories=[a.category for a in selected] + [self._neg_categories[j] for j in negatives],
            annotation_ids=[a.index for a in selected] + [-1 - j for j in range(len(negatives))],
            is_negative=[a.empty for a in selected] + [True] * len(negatives),
            orig_size=(h, w),
            epoch=epoch,
        )

    def read_original(self, index: int) -> Dict[str, object]:
        """Every expression of an image at its original resolution (for scoring or visualisation).

        Returns ``image`` uint8 (H,W,3), ``masks`` bool (k,H,W), ``descriptions``, ``categories``,
        ``annotation_ids``, ``name``. Raises :class:`DataError` for bad input (regardless of skip_bad_samples).
        """
        name = self.names[index]
        anns = self.reader.load_annotations(name, keep_empty=self.keep_empty)
        image = self.reader.open_image(name)
        h, w = image.height, image.width
        for ann in anns:
            err = self.reader.size_mismatch(name, ann, (h, w))
            if err is not None:
                raise err
        masks = np.zeros((len(anns), h, w), dtype=bool)
        nonempty = [i for i, a in enumerate(anns) if not a.empty]
        if nonempty:
            masks[nonempty] = self.reader.decode_masks(name, [anns[i] for i in nonempty])
        return {
            "name": name,
            "image": np.asarray(self.reader.decode_image(name, image)),
            "masks": masks,
            "descriptions": [a.description for a in anns],
            "categories": [a.category for a in anns],
            "annotation_ids": [a.index for a in anns],
        }


# --------------------------------------------------------------------------------------------------- samplers


class TrainSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle, ``set_epoch``) that yields ``(index, epoch)``.

    Carrying the epoch with the index lets persistent dataloader workers seed their per-epoch generator without
    the dataset object (a copy per worker) being told about the new epoch.
    """

    start = 0  # samples of this rank's epoch order to skip (resuming mid-epoch); see set_start

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of the epoch's order (a run resumed after ``start / batch_size`` steps)."""
        self.start = int(start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        for index in list(super().__iter__())[self.start:]:
            yield (index, epoch)

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)


class ShardedEvalSampler(Sampler[int]):
    """Evaluation sharding ``rank::world_size`` without padding: every image is evaluated exactly once across
    ranks (``DistributedSampler`` repeats images to even out the shards, which biases synced metrics)."""

    def __init__(self, data_source: Union[Sequence, int], rank: Optional[int] = None, world_size: Optional[int] = None):
        self.num_items = data_source if isinstance(data_source, int) else len(data_source)
        initialised = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.world_size))


def seed_worker(worker_id: int, seed: int = 0, rank: int = 0) -> None:
    """``worker_init_fn``: seed the global ``random`` / ``numpy`` / ``torch`` RNGs per (seed, rank, worker) so that
    any third-party code relying on them differs across workers (the dataset itself uses its own generators)."""
    import random

    ss = np.random.SeedSequence([seed, rank, worker_id])
    s32, s64 = ss.generate_state(2, dtype=np.uint32), ss.generate_state(1, dtype=np.uint64)
    random.seed(int(s32[0]))
    np.random.seed(int(s32[1]))
    torch.manual_seed(int(s64[0]) & ((1 << 63) - 1))


def build_train_loader(
    dataset: RISORSDataset,
    collate_fn: Callable,
    batch_size: int,
    num_workers: int = 4,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    drop_last: bool = True,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    prefetch_factor: Optional[int] = 2,
) -> DataLoader:
    """Training loader: shuffled distributed sampling (call ``loader.sampler.set_epoch(epoch)`` every epoch),
    persistent workers, pinned memory (when CUDA is available), per-worker seeding."""
    initialised = dist.is_available() and dist.is_initialized()
    world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
    dataset.rank = rank
    sampler = TrainSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    if num_workers > 0:
        # The Rust tokenizer's thread pool does not survive fork; the collate runs in the workers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=partial(seed_worker, seed=seed, rank=rank),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def build_eval_loader(
    dataset: RISORSDataset,
    collate_fn: Callable,
    batch_size: int,
    num_workers: int = 4,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = True,
    persistent_workers: bool = False,
) -> DataLoader:
    """Evaluation loader over this rank's shard (``ShardedEvalSampler``, no duplicates, order preserved).
    With ``skip_bad_samples`` a batch whose images were all bad comes out as ``None``."""
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedEvalSampler(dataset, rank, world_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=persistent_workers and num_workers > 0,
    )
