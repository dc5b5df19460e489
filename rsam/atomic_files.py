"""The one way RSAM writes a file: to a temporary name beside it, renamed over the target when complete.

    with atomic_path("out/manifest.jsonl") as tmp:        # any writer that takes a path
        with open(tmp, "w") as f: ...
    write_text_atomically("out/config.json", text)

A failure (an exception, a full disk, a kill) leaves the previous file as it was and no partial file behind.
The new file gets the usual permissions (0666 less the umask, 0644 by default), as ``open`` would give it,
not the 0600 of ``tempfile``. A full disk is a :class:`rsam.errors.UserError`:
``no space left on <folder> while writing <file>``.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Union

from rsam.errors import UserError

__all__ = ["atomic_path", "write_text_atomically", "write_bytes_atomically"]

PathLike = Union[str, os.PathLike]


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` (parents are created)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"no space left on {target.parent} while writing {target}") from None
        raise
    except RuntimeError as exc:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if _disk_full(target.parent):
            raise UserError(f"no space left on {target.parent} while writing {target}") from None
        raise exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _disk_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return stats.f_bavail == 0


def write_text_atomically(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically -> the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomically(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically -> the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
