"""Dataset readers, one module per on-disk format; all produce :class:`~rsam.data.readers.base.Annotation`
records per image. ``FORMATS`` maps a format name to its reader class; :func:`open_reader` builds one."""
from __future__ import annotations

from typing import Dict, Optional, Type

from rsam.data.readers.base import Annotation, Reader
from rsam.data.readers.jsonl import JsonlReader
from rsam.data.readers.phrases import RefSegRSReader, RISBenchReader
from rsam.data.readers.refer import ReferReader
from rsam.data.readers.risors import RISORSReader

__all__ = ["FORMATS", "Annotation", "Reader", "open_reader", "reader_class"]

FORMATS: Dict[str, Type[Reader]] = {
    "risors": RISORSReader,
    "rrsisd": ReferReader,
    "refsegrs": RefSegRSReader,
    "risbench": RISBenchReader,
    "jsonl": JsonlReader,
}


def reader_class(format: str) -> Type[Reader]:
    try:
        return FORMATS[format]
    except KeyError:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {sorted(FORMATS)}") from None


def open_reader(format: str, root: str, split: Optional[str], **options) -> Reader:
    """The reader of ``format`` for ``root`` / ``split`` with its format-specific ``options``."""
    return reader_class(format)(root, split, **options)
