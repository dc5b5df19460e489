"""Reading plain-data pickles without running them, and caching what was read as JSON.

Some releases ship their annotations as a Python pickle (RRSIS-D's ``refs(unc).p``). Unpickling runs whatever
callables the file names, so an untrusted pickle can execute arbitrary code. :func:`load_plain_pickle` allows
only what plain data needs -- builtin containers, str, bytes, int, float, bool and None -- and refuses every
other global with an error naming the file and the global, before anything is called. What was read is cached
as JSON (:func:`cached_json`, keyed by path, size and modification time), so later starts skip the pickle.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from typing import Any, Callable, Optional

from iopath.common.file_io import PathManager, g_pathmgr

__all__ = ["PickleRefused", "load_plain_pickle", "load_plain_pickle_cached", "cached_json", "default_cache_dir"]

log = logging.getLogger(__name__)

# Protocols < 4 build sets through a global, protocols < 3 bytes through _codecs.encode (a checked stand-in is
# returned for it); nothing else plain data needs is a global.
_ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}


def _bytes_from_latin1(text, encoding="latin1"):
    """What protocols 0-2 call to rebuild ``bytes`` (``_codecs.encode(str, "latin1")``), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as the latin-1 bytes constructor")
    return text.encode("latin1")


class PickleRefused(ValueError):
    """A pickle asked for a global that plain data does not need."""

    def __init__(self, path: str, global_name: str):
        super().__init__(f"{path}: refused to unpickle: the file asks for the global '{global_name}'; only builtin "
                         "containers, str, int, float, bool and None are allowed (pickles are never loaded blindly)")
        self.path, self.global_name = path, global_name


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return set if name == "set" else frozenset
        if (module, name) == ("_codecs", "encode"):
            return _bytes_from_latin1
        raise PickleRefused(self._path, f"{module}.{name}")

    def persistent_load(self, pid):
        raise PickleRefused(self._path, f"persistent id {pid!r}")


def _text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin1")


def _plain(value: Any, path: str) -> Any:
    """Containers -> dict / list, bytes -> str; anything else than plain data is refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, dict):
        return {(_text(k) if isinstance(k, bytes) else k): _plain(v, path) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, path) for v in value]
    raise PickleRefused(path, type(value).__qualname__)


def load_plain_pickle(path: str, path_manager: Optional[PathManager] = None) -> Any:
    """Unpickle ``path`` if it holds plain data only (see the module docstring); JSON-friendly result."""
    pm = path_manager or g_pathmgr
    with pm.open(path, "rb") as f:
        raw = f.read()
    for encoding in ("utf-8", "latin1"):  # latin1: Python 2 byte strings that are not UTF-8
        try:
            return _plain(_PlainUnpickler(io.BytesIO(raw), path, encoding).load(), path)
        except PickleRefused:
            raise
        except UnicodeDecodeError:
            continue
        except Exception as e:  # truncated, not a pickle, ...: pickle raises many types
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    raise ValueError(f"{path}: not a readable pickle (undecodable strings)")


def default_cache_dir() -> str:
    return os.environ.get("RSAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rsam")


def cached_json(source_path: str, build: Callable[[], Any], tag: str, cache_dir: Optional[str] = None) -> Any:
    """``build()``'s JSON-serialisable result, cached under ``cache_dir`` and keyed by ``source_path``'s
    absolute path, size and modification time (plus ``tag``); remote paths are not cached."""
    if "://" in source_path:
        return build()
    stat = os.stat(source_path)
    key = hashlib.sha256(f"{tag}\0{os.path.abspath(source_path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    folder = os.path.join(cache_dir or default_cache_dir(), "json")
    file = os.path.join(folder, key.hexdigest() + ".json")
    try:
        with open(file, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        pass  # absent or corrupt: rebuild
    value = build()
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, file)
    except OSError as e:
        log.warning("cannot write the cache %s (%s); %s is read again next time", file, e, source_path)
    return value


def load_plain_pickle_cached(path: str, cache_dir: Optional[str] = None,
                             path_manager: Optional[PathManager] = None) -> Any:
    """:func:`load_plain_pickle` through :func:`cached_json`."""
    return cached_json(path, lambda: load_plain_pickle(path, path_manager), "plain-pickle", cache_dir)
