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

# Protocols < 4 build sets through a global, protocols < 3 bytes through _codecs.encode and b"" through bytes()
# (checked stand-ins are returned for those two); nothing else plain data needs is a global.
_ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}


def _bytes_from_latin1(text, encoding="latin1"):
    """What protocols 0-2 call to rebuild ``bytes`` (``_codecs.encode(str, "latin1")``), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as the latin-1 bytes constructor")
    return text.encode("latin1")


def _empty_bytes(*args):
    """What protocols 0-2 call to rebuild ``b""`` (``bytes()``), and nothing else."""
    if args:
        raise pickle.UnpicklingError("bytes() is only allowed without arguments (the empty bytes)")
    return b""


class PickleRefused(ValueError):
    """A pickle asked for a global that plain data does not need."""

    def __init__(self, path: str, global_name: str):
        super().__init__(f"{path}: refused to unpickle: the file asks for the global '{global_name}'; only builtin "
                         "containers, str, int, float, bool and None are allowed (pickles are never loaded blindly)")
        self.path, self.global_name = path, global_name

    def __reduce__(self):  # picklable across processes despite the 2-argument constructor
        return (PickleRefused, (self.path, self.global_name))


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return set if name == "set" else frozenset
        if (module, name) == ("_codecs", "encode"):
            return _bytes_from_latin1
        if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return _empty_bytes
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
    if isinstance(value, (bytes, bytearray)):
        return _text(bytes(value))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = _text(k) if isinstance(k, bytes) else k
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise ValueError(f"{path}: a dict key of type {type(k).__name__} is not plain data")
            out[k] = _plain(v, path)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, path) for v in value]
    raise PickleRefused(path, type(value).__qualname__)


def load_plain_pickle(path: "str | os.PathLike", path_manager: Optional[PathManager] = None) -> Any:
    """Unpickle ``path`` if it holds plain data only (see the module docstring); JSON-friendly result."""
    path, pm = os.fspath(path), path_manager or g_pathmgr
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
    """``$RSAM_CACHE_DIR`` if set, else ``~/.cache/rsam`` (JSON copies go to its ``json/`` folder)."""
    return os.environ.get("RSAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rsam")


_ITEMS = "__rsam_items__"  # how a dict whose keys are not all str is stored: {"__rsam_items__": [[key, value]]}


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        if _ITEMS not in value and all(isinstance(k, str) for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return {_ITEMS: [[k, _to_json(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if _ITEMS in value:
            return {k: _from_json(v) for k, v in value[_ITEMS]}
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def cached_json(source_path: "str | os.PathLike", build: Callable[[], Any], tag: str,
                cache_dir: "str | os.PathLike | None" = None) -> Any:
    """``build()``'s JSON-serialisable result, cached under ``cache_dir`` and keyed by ``source_path``'s
    absolute path, size and modification time (plus ``tag``); remote paths are not cached. The value is returned
    as stored (tuples and sets -> lists; int/float/bool/None dict keys kept), so first call and cache hits agree."""
    source_path = os.fspath(source_path)
    if "://" in source_path:
        return _from_json(json.loads(json.dumps(_to_json(build()))))
    stat = os.stat(source_path)
    key = f"v2\0{tag}\0{os.path.abspath(source_path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    folder = os.path.join(os.fspath(cache_dir) if cache_dir else default_cache_dir(), "json")
    file = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest() + ".json")
    try:
        with open(file, "r", encoding="utf-8") as f:
            return _from_json(json.load(f))
    except (OSError, ValueError, TypeError):
        pass  # absent or corrupt (bad JSON, not UTF-8, malformed entries): rebuild
    text = json.dumps(_to_json(build()))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, file)
    except OSError as e:
        log.warning("cannot write the cache %s (%s); %s is read again next time", file, e, source_path)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return _from_json(json.loads(text))


def load_plain_pickle_cached(path: "str | os.PathLike", cache_dir: "str | os.PathLike | None" = None,
                             path_manager: Optional[PathManager] = None) -> Any:
    """:func:`load_plain_pickle` through :func:`cached_json`."""
    return cached_json(path, lambda: load_plain_pickle(path, path_manager), "plain-pickle", cache_dir)
