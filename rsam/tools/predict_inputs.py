"""What ``rsam-predict`` reads: image paths (files, folders, globs), the expressions of each image
(``--text`` or ``--texts-file``) and the pixels of rasters of any depth and band count.

Texts files (``--texts-file``):

* JSON: ``{"<image>": ["expression", ...], ...}`` (a single string is one expression);
* CSV: a header with the columns ``image`` and ``expression``, one row per expression.

A key matches an image by path -- absolute, or relative to the texts file's folder, or relative to the current
directory -- and otherwise by file name alone (``scene_01.png``) when exactly one key has that file name.

Rasters: 8-bit images (JPEG, PNG, TIFF) keep their values (grey is replicated to RGB, an alpha channel is
dropped). Anything else -- 16-bit, 32-bit, float, multispectral -- is turned into 8-bit RGB as follows:

1. bands: ``--bands 3,2,1`` picks three bands (1-based, in R,G,B order) or one (``--bands 4``: grey). Without
   it, 1 band is grey, 3 bands are R,G,B, 2 or 4 bands use the first 1 or 3 (grey / RGB + alpha or NIR), and
   more bands are an error asking for ``--bands``;
2. stretch (not for 8-bit data): each selected band separately, ``lo`` and ``hi`` = its 2nd and 98th
   percentiles (``--stretch 2,98``) over its valid pixels (finite, not the raster's nodata value; computed on
   at most ~1 M pixels, a regular subsample), then ``round(255 * clip((x - lo) / (hi - lo), 0, 1))``; a band
   with ``hi <= lo`` (constant) becomes 0, as do invalid pixels.

TIFFs are read with rasterio when it is installed (``pip install "rsam[geo]"``); a georeferenced input then
also gets its masks as GeoTIFFs with the same CRS and transform. Without rasterio, TIFFs and PNGs go through
Pillow, and 16-bit colour files through OpenCV when that is installed.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from rsam.data.images import ImageInputError, _pil_bit_depth, load_image
from rsam.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "UsageError", "whole_image_pixel_limit", "check_whole_image_size", "parse_device", "LoadedImage", "TextTable", "collect_inputs", "read_texts_file",
           "parse_bands", "parse_stretch", "read_image", "to_rgb8", "write_geotiff_mask", "have_rasterio"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_GLOB_CHARS = "*?["
_MAX_STRETCH_SAMPLES = 1_000_000


class UsageError(UserError):
    """A problem with the command line or a file it names as a whole (exit status 2)."""


def parse_device(text: str):
    """``--device`` -> ``torch.device``; a usage error for a malformed name, a device type other than cpu / cuda /
    mps, or a device this machine does not have (checked now, before any model is loaded)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA GPU is available on this machine (torch.cuda.is_available() "
                             "is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {text}: use cpu, cuda, cuda:N or mps")
    return device


# ------------------------------------------------------------------------------------------------------------
# paths and expressions


def collect_inputs(specs: Sequence[str]) -> List[str]:
    """Files as given, the images of folders (sorted, not recursive) and glob matches (sorted; ``**`` recurses),
    without duplicates. A missing plain path is kept (its reading fails and is reported with the others); an
    image-less folder or a glob that matches nothing is a :class:`UsageError`."""
    out: List[str] = []
    for spec in specs:
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
            if not names:
                raise UsageError(f"{spec}: the folder holds no images ({' '.join(IMAGE_EXTENSIONS)})")
            out += [os.path.join(path, n) for n in names]
        elif os.path.isfile(path) or not any(c in spec for c in _GLOB_CHARS):
            out.append(path)
        else:
            matches = sorted(m for m in glob.glob(path, recursive=True)
                             if os.path.isfile(m) and m.lower().endswith(IMAGE_EXTENSIONS))
            if not matches:
                raise UsageError(f"{spec}: no image file matches this pattern")
            out += matches
    seen, unique = set(), []
    for p in out:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _expressions(value, where: str) -> List[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise UsageError(f"{where}: expected an expression or a non-empty list of expressions")
    if any(not t.strip() for t in items):
        raise UsageError(f"{where}: empty expression")
    return [t.strip() for t in items]


def read_texts_file(path: str) -> Dict[str, List[str]]:
    """``{image key: [expressions]}`` from a JSON or CSV texts file (see the module docstring)."""
    if not os.path.isfile(path):
        raise UsageError(f"--texts-file {path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if ext == ".csv":
                return _read_csv(f, path)
            if ext != ".json":
                raise UsageError(f"--texts-file {path}: must end in .json or .csv")
            data = json.load(f)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{path}: expected a non-empty JSON object {{image: [expressions]}}")
    return {str(k): _expressions(v, f"{path}: key {k!r}") for k, v in data.items()}


def _read_csv(f, path: str) -> Dict[str, List[str]]:
    reader = csv.DictReader(f)
    fields = {(name or "").strip().lower(): name for name in (reader.fieldnames or [])}
    missing = [c for c in ("image", "expression") if c not in fields]
    if missing:
        raise UsageError(f"{path}: the CSV header needs the columns image,expression (missing: {', '.join(missing)}"
                         f"; found: {', '.join(reader.fieldnames or []) or 'nothing'})")
    table: Dict[str, List[str]] = {}
    for row in reader:
        image = (row.get(fields["image"]) or "").strip()
        text = (row.get(fields["expression"]) or "").strip()
        if not image or not text:
            raise UsageError(f"{path}, line {reader.line_num}: empty {'image' if not image else 'expression'} field")
        table.setdefault(image, []).append(text)
    if not table:
        raise UsageError(f"{path}: no rows under the header")
    return table


class TextTable:
    """Looks up the expressions of an image in a texts file's table (matching rules: module docstring)."""

    def __init__(self, table: Dict[str, List[str]], base_dir: str):
        self.table = table
        self.base_dir = base_dir
        self.by_path: Dict[str, str] = {}
        self.by_name: Dict[str, List[str]] = {}
        for key in table:
            expanded = os.path.expanduser(key)
            for base in ([""] if os.path.isabs(expanded) else [base_dir, os.getcwd()]):
                self.by_path.setdefault(self._norm(os.path.join(base, expanded)), key)
            self.by_name.setdefault(os.path.basename(expanded), []).append(key)
        self.used: set = set()

    @staticmethod
    def _norm(path: str) -> str:
        return os.path.normcase(os.path.realpath(path))

    def lookup(self, image: str) -> Optional[List[str]]:
        key = self.by_path.get(self._norm(image))
        if key is None:
            names = self.by_name.get(os.path.basename(image), [])
            key = names[0] if len(names) == 1 else None
        if key is None:
            return None
        self.used.add(key)
        return self.table[key]

    def unused(self) -> List[str]:
        return [k for k in self.table if k not in self.used]

    def images(self) -> List[str]:
        """The image of every key, in the file's order: the key as a path (absolute, or relative to the texts
        file's folder, else to the current directory). A key naming no file keeps the first candidate, whose
        reading then fails and is reported with the others."""
        out = []
        for key in self.table:
            expanded = os.path.expanduser(key)
            candidates = [expanded] if os.path.isabs(expanded) else [os.path.join(self.base_dir, expanded), expanded]
            out.append(next((c for c in candidates if os.path.isfile(c)), candidates[0]))
            self.used.add(key)
        return out


# ------------------------------------------------------------------------------------------------------------
# pixels


def _int_list(text: str, flag: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None


def parse_bands(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``"3,2,1"`` -> (3, 2, 1): one or three 1-based band numbers."""
    if text is None:
        return None
    values = _int_list(text, "--bands")
    if len(values) not in (1, 3) or any(v != int(v) or v < 1 for v in values):
        raise UsageError(f"--bands {text!r}: give 3 band numbers (R,G,B) or 1 (grey), counted from 1")
    return tuple(int(v) for v in values)


def parse_stretch(text: str) -> Tuple[float, float]:
    """``"2,98"`` -> (2.0, 98.0): the low and high percentiles of the stretch, 0 <= lo < hi <= 100."""
    values = _int_list(text, "--stretch")
    if len(values) != 2 or not 0 <= values[0] < values[1] <= 100:
        raise UsageError(f"--stretch {text!r}: expected LO,HI percentiles with 0 <= LO < HI <= 100")
    return values[0], values[1]


@dataclass
class LoadedImage:
    """rgb: uint8 (H, W, 3); georef: ``{"crs", "transform"}`` of a georeferenced raster (rasterio) or None;
    note: how the pixels were converted (empty for plain 8-bit images)."""

    rgb: np.ndarray
    georef: Optional[dict] = None
    note: str = ""


def have_rasterio() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def _read_rasterio(path: str) -> Tuple[np.ndarray, Optional[dict], Optional[float]]:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                data = src.read()  # (C, H, W)
                crs, transform, nodata = src.crs, src.transform, src.nodata
    except RasterioError as exc:
        raise ImageInputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    georef = {"crs": crs, "transform": transform} if crs is not None or not transform.is_identity else None
    return np.moveaxis(data, 0, -1), georef, nodata


def _read_high_depth(path: str, depth: int, mode: str) -> np.ndarray:
    """A > 8-bit file that Pillow cannot give at full depth (colour 16-bit) -> (H, W, C) through OpenCV."""
    try:
        import cv2
    except ImportError:
        raise ImageInputError(f"{path}: {depth}-bit {mode} image; reading it needs rasterio (pip install "
                              "\"rsam[geo]\") or OpenCV (pip install opencv-python-headless)") from None
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageInputError(f"{path}: cannot read the image (OpenCV could not decode it)")
    if array.ndim == 2:
        return array[..., None]
    order = [2, 1, 0, 3][: array.shape[2]] if array.shape[2] in (3, 4) else list(range(array.shape[2]))
    return array[..., order]  # BGR(A) -> RGB(A)


def _read_pillow(path: str) -> Tuple[np.ndarray, int]:
    """(H, W, C) array at the file's own depth, and that depth, through Pillow (OpenCV for colour 16-bit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            depth = _pil_bit_depth(im)
            if depth > 8 and im.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                return _read_high_depth(path, depth, im.mode), depth
            im.load()
            if depth <= 8 and im.mode not in ("L", "RGB", "RGBA", "LA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("PA", "RGBa", "La") else "RGB")
            array = np.asarray(im)
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        hint = "; multi-band TIFFs need rasterio (pip install \"rsam[geo]\")" if path.lower().endswith(
            (".tif", ".tiff")) else ""
        raise ImageInputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}){hint}") from None
    return (array[..., None] if array.ndim == 2 else array), depth


def whole_image_pixel_limit() -> int:
    """The most pixels an image read whole may have: PIL's decompression-bomb guard (``MAX_IMAGE_PIXELS``, 89.5
    million by default), for every format. Larger scenes go through scene mode, which reads windows."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_whole_image_size(path: str, with_rasterio: bool) -> None:
    """Refuse, from the file's header and before any pixel is decoded, an image over
    :func:`whole_image_pixel_limit` (a few bytes can declare 30000 x 30000 px)."""
    from PIL import Image

    try:
        if with_rasterio:
            import rasterio

            with rasterio.open(path) as src:
                width, height = src.width, src.height
        else:
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:  # over twice the guard: PIL refuses to open it at all
        raise ImageInputError(f"{path}: {str(exc).rstrip('.')}; use --scene (tiles at native resolution)") from None
    except Exception:  # not readable at all: the reader that follows names the file and the problem
        return
    if width * height > whole_image_pixel_limit():
        raise ImageInputError(f"{path}: {width} x {height} px is over the {whole_image_pixel_limit():,} pixels that "
                              "a whole-image prediction reads into memory; use --scene (tiles at native resolution)")


def read_image(path: str, bands: Optional[Sequence[int]] = None,
               stretch: Tuple[float, float] = (2.0, 98.0)) -> LoadedImage:
    """Read an image file as uint8 RGB (see the module docstring for bands and the stretch)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    tiff = path.lower().endswith((".tif", ".tiff"))
    check_whole_image_size(path, tiff and have_rasterio())
    georef, nodata = None, None
    if tiff and have_rasterio():
        array, georef, nodata = _read_rasterio(path)
    else:
        if bands is None:
            from PIL import Image

            try:  # plain 8-bit files: exactly what the predictor's own loader gives
                with Image.open(path) as im:
                    plain = _pil_bit_depth(im) <= 8
            except Exception:  # unreadable: load_image below names the file
                plain = True
            if plain:
                return LoadedImage(load_image(path))
        array, _ = _read_pillow(path)
    rgb, note = to_rgb8(array, bands, stretch, path, nodata)
    return LoadedImage(rgb, georef, note)


def _stretch_band(band: np.ndarray, lo_p: float, hi_p: float, nodata: Optional[float]) -> np.ndarray:
    values = band.astype(np.float64)
    valid = np.isfinite(values)
    if nodata is not None and np.isfinite(nodata):
        valid &= values != nodata
    sample = values[valid]
    if sample.size == 0:
        return np.zeros(band.shape, np.uint8)
    sample = sample[:: max(1, sample.size // _MAX_STRETCH_SAMPLES)]
    lo, hi = np.percentile(sample, [lo_p, hi_p])
    if hi <= lo:
        return np.zeros(band.shape, np.uint8)
    scaled = np.clip((np.where(valid, values, lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.where(valid, np.round(scaled * 255.0), 0).astype(np.uint8)


def to_rgb8(array: np.ndarray, bands: Optional[Sequence[int]], stretch: Tuple[float, float], where: str,
            nodata: Optional[float] = None) -> Tuple[np.ndarray, str]:
    """(H, W, C) array of any dtype -> (uint8 (H, W, 3), note on the conversion)."""
    c = array.shape[2]
    if bands is None:
        if c > 4:
            raise ImageInputError(f"{where}: {c} bands; pick three (R,G,B) or one with --bands, e.g. --bands 3,2,1")
        picked = list(range(1 if c in (1, 2) else 3))
    else:
        missing = [b for b in bands if b > c]
        if missing:
            raise ImageInputError(f"{where}: --bands {','.join(map(str, bands))}: the image has {c} band(s), "
                                  f"no band {missing[0]}")
        picked = [b - 1 for b in bands]
    x = array[..., picked]
    notes = [f"bands {','.join(str(b + 1) for b in picked)} of {c}"] if (bands is not None or c not in (1, 3)) else []
    if x.dtype == np.bool_:
        x = x.astype(np.uint8) * 255
    elif x.dtype != np.uint8:
        lo_p, hi_p = stretch
        x = np.stack([_stretch_band(x[..., i], lo_p, hi_p, nodata) for i in range(x.shape[2])], axis=-1)
        notes.append(f"{array.dtype} stretched per band, {lo_p:g}-{hi_p:g} % percentiles -> 0-255")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return np.ascontiguousarray(x), "; ".join(notes)


def write_geotiff_mask(path: str, mask: np.ndarray, georef: dict) -> None:
    """bool (H, W) -> single-band uint8 GeoTIFF (0 / 255) with ``georef``'s CRS and transform (rasterio)."""
    import rasterio

    h, w = mask.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=1, dtype="uint8",
                       crs=georef.get("crs"), transform=georef["transform"], compress="deflate") as dst:
        dst.write(np.where(mask, 255, 0).astype(np.uint8)[None])
