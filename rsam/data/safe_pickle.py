"""Reading plain-data pickles without running them, and caching what was read as JSON.

Some releases ship their annotations as a Python pickle (RRSIS-D's ``refs(unc).p``). Unpickling runs whatever
callables the file names, so an untrusted pickle can execute arbitrary code. :func:`load_plain_pickle` allows
only what plain data needs -- builtin containers, str, bytes, int, float, bool and None -- and refuses every
other global with an error naming the file and the global, before anything is called. A few bytes of pickle can
also describe a huge value (a list that holds the previous list eight times, level after level, through the
memo): :func:`check_plain` measures what the value expands to, without expanding it, and refuses it over the
limits of rsam/data/limits.py (elements, nesting depth, integer size). Before any of that, the opcodes are
walked once to refuse a memo index that would make the unpickler allocate a huge table. What was read is cached
as JSON (:func:`cached_json`, keyed by path, size and modification time), so later starts skip the pickle; the
cache writer checks every value it stores the same way.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import pickletools
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from iopath.common.file_io import PathManager, g_pathmgr

from rsam.atomic_files import write_text_atomically
from rsam.data.limits import (MAX_PICKLE_DEPTH, MAX_PICKLE_ELEMENTS, MAX_PICKLE_ELEMENTS_PER_BYTE,
                              MAX_PICKLE_INT_BITS, PICKLE_ELEMENTS_FLOOR)
from rsam.errors import UserError

__all__ = ["PickleRefused", "PickleTooLarge", "check_plain", "load_plain_pickle", "load_plain_pickle_cached",
           "cached_json", "default_cache_dir"]

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


class PickleRefused(UserError):
    """A pickle asked for a global that plain data does not need."""

    def __init__(self, path: str, global_name: str):
        super().__init__(f"{path}: refused to unpickle: the file asks for the global '{global_name}'; only builtin "
                         "containers, str, int, float, bool and None are allowed (pickles are never loaded blindly)")
        self.path, self.global_name = path, global_name

    def __reduce__(self):  # picklable across processes despite the 2-argument constructor
        return (PickleRefused, (self.path, self.global_name))


class PickleTooLarge(PickleRefused):
    """A pickle that describes too large a value: over a limit of rsam/data/limits.py, or built to make the
    unpickler allocate a huge table (``limit`` says what)."""

    def __init__(self, path: str, limit: str):
        UserError.__init__(self, f"{path}: refused to unpickle: {limit}")
        self.path, self.limit, self.global_name = path, limit, None

    def __reduce__(self):
        return (PickleTooLarge, (self.path, self.limit))


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


_CONTAINERS = (dict, list, tuple, set, frozenset)
_SCALARS = (type(None), bool, float, str, bytes, bytearray)
_INT_BOUND = 1 << (MAX_PICKLE_INT_BITS - 1)
_END = object()


def _children(container) -> Iterator:
    return itertools.chain.from_iterable(container.items()) if isinstance(container, dict) else iter(container)


def _is_scalar(value: Any, path: str) -> bool:
    """True for a plain scalar (an integer within the size limit), False for a container; refuses the rest."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -_INT_BOUND <= value < _INT_BOUND:
            raise PickleTooLarge(path, f"an integer of {value.bit_length()} bits is over the limit of "
                                       f"{MAX_PICKLE_INT_BITS}-bit signed integers (rsam/data/limits.py)")
        return True
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, _CONTAINERS):
        return False
    raise PickleRefused(path, type(value).__qualname__)


_ELEMENTS_LIMIT = " (rsam/data/limits.py)"


def check_plain(value: Any, path: str, max_elements: int = MAX_PICKLE_ELEMENTS, budget: str = _ELEMENTS_LIMIT) -> int:
    """Refuse ``value`` unless it is plain data within the limits of rsam/data/limits.py -> its element count.

    Elements are containers and scalars as the value expands (a container referenced eight times counts eight
    times), measured without expanding anything: each container is measured once and its count reused. A
    container inside itself, nesting deeper than ``MAX_PICKLE_DEPTH``, more than ``max_elements`` elements
    (``budget`` says where that number comes from) or an integer over ``MAX_PICKLE_INT_BITS`` bits is refused with
    :class:`PickleTooLarge`; a type plain data does not have with :class:`PickleRefused`.
    """
    if _is_scalar(value, path):
        return 1
    measured: Dict[int, int] = {}  # id -> elements of a container measured before (``value`` keeps them alive)
    inside: Set[int] = set()  # the containers on the path from the root to the current one
    frames: List[list] = [[value, _children(value), 0]]  # [container, its children, total when it was entered]
    inside.add(id(value))
    total = 1
    while frames:
        frame = frames[-1]
        child = next(frame[1], _END)
        if child is _END:
            frames.pop()
            inside.discard(id(frame[0]))
            measured[id(frame[0])] = total - frame[2]
            continue
        if _is_scalar(child, path):
            total += 1
        elif id(child) in measured:
            total += measured[id(child)]
        elif id(child) in inside:
            raise PickleTooLarge(path, "a container holds itself (its expansion has no end)")
        elif len(frames) >= MAX_PICKLE_DEPTH:
            raise PickleTooLarge(path, f"containers are nested deeper than {MAX_PICKLE_DEPTH} levels "
                                       "(rsam/data/limits.py)")
        else:
            frames.append([child, _children(child), total])
            inside.add(id(child))
            total += 1
        if total > max_elements:
            raise PickleTooLarge(path, f"it expands to more than {max_elements} elements{budget}")
    return total


def _text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin1")


def _plain(value: Any, path: str) -> Any:
    """Containers -> dict / list, bytes -> str (``value`` passed :func:`check_plain`, so this ends)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return _text(bytes(value))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = _text(k) if isinstance(k, bytes) else k
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise UserError(f"{path}: a dict key of type {type(k).__name__} is not plain data")
            out[k] = _plain(v, path)
        return out
    return [_plain(v, path) for v in value]


_MEMO_WRITES = ("PUT", "BINPUT", "LONG_BINPUT")


def _check_opcodes(raw: bytes, path: str) -> None:
    """Walk the opcodes (``pickletools``, which reads nothing past the file's end) before the unpickler runs.

    The C unpickler sizes its memo table by the largest index a PUT names and clears it: five bytes could make it
    allocate and write 64 GB. Picklers number their memo entries 0, 1, 2, ..., so an index may not run ahead of
    the entries written before it.
    """
    written = 0
    try:
        for op, arg, pos in pickletools.genops(raw):
            if op.name in _MEMO_WRITES:
                if arg > written:
                    raise PickleTooLarge(path, f"memo index {arg} at byte {pos} runs ahead of the {written} "
                                               "entries written before it")
                written += 1
            elif op.name == "MEMOIZE":
                written += 1
    except PickleTooLarge:
        raise
    except Exception as e:  # truncated, unknown opcode, bad argument: pickletools raises ValueError and others
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _element_budget(size: int) -> Tuple[int, str]:
    """The element limit of a ``size``-byte pickle, and where it comes from (for the message)."""
    by_size = max(PICKLE_ELEMENTS_FLOOR, MAX_PICKLE_ELEMENTS_PER_BYTE * size)
    if by_size < MAX_PICKLE_ELEMENTS:
        return by_size, (f" (the limit of a {size}-byte file: {MAX_PICKLE_ELEMENTS_PER_BYTE} per byte, at least "
                         f"{PICKLE_ELEMENTS_FLOOR}; rsam/data/limits.py)")
    return MAX_PICKLE_ELEMENTS, _ELEMENTS_LIMIT


def load_plain_pickle(path: "str | os.PathLike", path_manager: Optional[PathManager] = None) -> Any:
    """Unpickle ``path`` if it holds plain data only, within the limits of rsam/data/limits.py (see the module
    docstring); JSON-friendly result. Raises :class:`PickleRefused` / :class:`PickleTooLarge`, or
    :class:`rsam.errors.UserError` for a file that is not a pickle; each names the file."""
    path, pm = os.fspath(path), path_manager or g_pathmgr
    with pm.open(path, "rb") as f:
        raw = f.read()
    _check_opcodes(raw, path)
    max_elements, budget = _element_budget(len(raw))
    for encoding in ("utf-8", "latin1"):  # latin1: Python 2 byte strings that are not UTF-8
        try:
            value = _PlainUnpickler(io.BytesIO(raw), path, encoding).load()
        except PickleRefused:
            raise
        except UnicodeDecodeError:
            continue
        except Exception as e:  # truncated, not a pickle, ...: pickle raises many types
            raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
        check_plain(value, path, max_elements, budget)
        return _plain(value, path)
    raise UserError(f"{path}: not a readable pickle (undecodable strings)")


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
        value = build()
        check_plain(value, source_path)
        return _from_json(json.loads(json.dumps(_to_json(value))))
    stat = os.stat(source_path)
    key = f"v2\0{tag}\0{os.path.abspath(source_path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    folder = os.path.join(os.fspath(cache_dir) if cache_dir else default_cache_dir(), "json")
    file = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest() + ".json")
    try:
        with open(file, "r", encoding="utf-8") as f:
            return _from_json(json.load(f))
    except (OSError, ValueError, TypeError, RecursionError):
        pass  # absent or corrupt (bad JSON, not UTF-8, malformed entries): rebuild
    value = build()
    check_plain(value, source_path)  # the writer stores only plain data within the limits, whoever built it
    text = json.dumps(_to_json(value))
    try:
        write_text_atomically(file, text)
    except (OSError, UserError) as e:  # UserError: a full disk; the cache is optional
        log.warning("cannot write the cache %s (%s); %s is read again next time", file, e, source_path)
    return _from_json(json.loads(text))


def load_plain_pickle_cached(path: "str | os.PathLike", cache_dir: "str | os.PathLike | None" = None,
                             path_manager: Optional[PathManager] = None) -> Any:
    """:func:`load_plain_pickle` through :func:`cached_json`."""
    return cached_json(path, lambda: load_plain_pickle(path, path_manager), "plain-pickle", cache_dir)
