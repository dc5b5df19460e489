"""Phrase-list releases: RefSegRS and RISBench.

Both list one expression per line in ``output_phrase_<split>.txt`` as ``<key> <expression>`` (split once on the
first space) and store one image and one mask file per key:

* ``refsegrs``: ``images/<id>.tif``, ``masks/<id>.tif``; masks single- or 3-channel (the first channel is
  read), foreground = value > 50.
* ``risbench``: ``img_rgb/<file>``, ``mask/<file>`` (the key is the file name with its extension); foreground =
  value > 0. Expressions can be long: the tokenizer's limit is checked by ``rsam-data check``.

Neither stores a category. The category is the class name that occurs first in the text
(:func:`rsam.data.readers.base.category_from_text`), else None: a heuristic, used only for per-category
metrics and for drawing no-target expressions.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
from iopath.common.file_io import PathManager, g_pathmgr

from rsam.data.errors import DataError
from rsam.data.readers.base import Annotation, Reader, category_from_text, raise_error
from rsam.data.readers.pictures import decode_values

__all__ = ["PhraseListReader", "RefSegRSReader", "RISBenchReader", "REFSEGRS_CLASSES", "RISBENCH_CLASSES"]

REFSEGRS_CLASSES = ("road", "vehicle", "car", "van", "building", "truck", "trailer", "bus", "road marking",
                    "bikeway", "sidewalk", "tree", "low vegetation", "impervious surface")
# The RISBench release stores no category; these are the 26 class names third-party loaders match in the text
# (RSRefSeg-2). Pass ``category_names`` for another list.
RISBENCH_CLASSES = ("expressway service area", "expressway toll station", "ground track field", "basketball court",
                    "container crane", "roundabout", "windmill", "overpass", "stadium", "bridge", "soccer ball field",
                    "baseball diamond", "train station", "golf field", "airport", "harbor", "dam", "ship", "helipad",
                    "vehicle", "chimney", "airplane", "helicopter", "tennis court", "storage tank", "swimming pool")


class PhraseListReader(Reader):
    """One split of a phrase-list release; subclasses set the folders, key handling and threshold."""

    image_dir: ClassVar[str] = ""
    mask_dir: ClassVar[str] = ""
    foreground_above: ClassVar[int] = 0
    default_classes: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, root: str, split: Optional[str] = "train", category_names: Optional[Sequence[str]] = None,
                 path_manager: Optional[PathManager] = None):
        super().__init__(root, split, path_manager)
        if split is None:
            raise ValueError(f"{self.format}: a split is required")
        self.category_names = tuple(category_names or self.default_classes)
        self.where = self.join(f"output_phrase_{split}.txt")
        if not self.pm.exists(self.where):
            found = self.available_splits(self.root, path_manager=self.pm)
            raise DataError(self.where, f"split list not found; this dataset has the splits {found}", "missing_file")
        self._expressions: Dict[str, List[Tuple[str, int]]] = {}
        for number, line in self.read_text_lines(self.where, "split list"):
            if line is None or not line.strip():
                continue
            key, _, text = line.strip().partition(" ")
            if not text.strip():
                self.problems.append(DataError(self.where, f"line {number}: expected '<key> <expression>', got "
                                                           f"{line.strip()[:60]!r}", "description"))
                continue
            self._expressions.setdefault(self.key_to_name(key), []).append((text.strip(), number))
        self.names = sorted(self._expressions)
        if not self.names and not self.problems:
            raise DataError(self.where, "split list is empty", "missing_file")

    @classmethod
    def available_splits(cls, root: str, path_manager: Optional[PathManager] = None, **_) -> List[str]:
        pm = path_manager or g_pathmgr
        root = str(root).rstrip("/")
        names = pm.ls(root) if pm.isdir(root) else []
        found = sorted(n[len("output_phrase_"):-4] for n in names
                       if n.startswith("output_phrase_") and n.endswith(".txt"))
        if not found:
            raise DataError(root, f"not a {cls.format} dataset: no output_phrase_<split>.txt", "missing_file")
        return found

    def key_to_name(self, key: str) -> str:
        return key

    def image_path(self, name: str) -> str:
        return self.join(self.image_dir, name)

    def mask_path(self, name: str) -> str:
        return self.join(self.mask_dir, name)

    def annotation_path(self, name: str) -> str:
        return self.mask_path(name)

    def files_of(self, name: str) -> List[str]:
        return [self.image_path(name), self.mask_path(name)]

    def load_annotations(self, name: str, on_bad_record: Callable[[DataError], None] = raise_error,
                         keep_empty: bool = False, on_zero_area: Optional[Callable[[], None]] = None
                         ) -> List[Annotation]:
        # The mask's area is only known after decoding: an empty mask shows up as an empty target.
        return [Annotation(i, text, category_from_text(text, self.category_names), float("inf"),
                           self.mask_path(name), source_id=f"{self.where}:{number}")
                for i, (text, number) in enumerate(self._expressions[name])]

    def decode_stored_masks(self, name: str, annotations: Sequence[Annotation]) -> List[np.ndarray]:
        path = self.mask_path(name)
        values = decode_values(self.open_picture(path, "mask"))
        if values.dtype == bool:  # 1-bit masks: already foreground / background
            mask = np.ascontiguousarray(values if values.ndim == 2 else values[..., 0])
            return [mask] * len(annotations)
        if values.ndim == 3:
            values = values[..., 0]
        mask = np.ascontiguousarray(values > self.foreground_above)
        return [mask] * len(annotations)


class RefSegRSReader(PhraseListReader):
    format = "refsegrs"
    image_dir, mask_dir, foreground_above = "images", "masks", 50
    default_classes = REFSEGRS_CLASSES

    def key_to_name(self, key: str) -> str:
        return key if key.lower().endswith((".tif", ".tiff")) else f"{key}.tif"


class RISBenchReader(PhraseListReader):
    format = "risbench"
    image_dir, mask_dir, foreground_above = "img_rgb", "mask", 0
    default_classes = RISBENCH_CLASSES
