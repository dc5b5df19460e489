"""How big a dataset file may say it is: the limits every reader checks before a library builds anything.

A downloaded dataset is untrusted input. A few bytes can declare a huge picture, mask or pickle, so each size is
checked where it is first known, and a file over a limit is refused with an error naming the file and the limit.
The limits are far above every released referring remote-sensing benchmark (and RefCOCO-style releases).

Pictures and masks (``rsam.data.readers.pictures``, ``rsam.data.rle``):
    ``MAX_PICTURE_PIXELS``: width x height that PIL's header of an image or mask file may give, and that a COCO
    RLE's ``size`` may give. It sits below PIL's own decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``,
    89,478,485 by default), which still applies when it is lowered. Benchmarks are 512-1024 px on a side.

Pickled annotation files (``rsam.data.safe_pickle``), counted on what the unpickled value expands to (a list
that the file references eight times counts eight times):
    ``MAX_PICKLE_ELEMENTS``: containers plus scalars. A RefCOCO-sized refs file (50,000 refs, 142,000
    sentences with their tokens) holds about 2.8 million, RefCOCOg's (85,000 refs) 3.3 million, RRSIS-D's
    (17,402 refs) 0.6 million.
    ``MAX_PICKLE_ELEMENTS_PER_BYTE``: elements per byte of the file (at least ``PICKLE_ELEMENTS_FLOOR``). A
    pickle spends at least one byte on each element unless it shares a container; refs files hold about 0.15.
    ``MAX_PICKLE_DEPTH``: nesting of containers (refs are 5 deep: list, ref, sentences, sentence, tokens).
    ``MAX_PICKLE_INT_BITS``: integers are signed 64-bit values (ids, sizes).
"""
from __future__ import annotations

from PIL import Image

__all__ = ["MAX_PICTURE_PIXELS", "MAX_PICKLE_ELEMENTS", "MAX_PICKLE_ELEMENTS_PER_BYTE", "PICKLE_ELEMENTS_FLOOR",
           "MAX_PICKLE_DEPTH", "MAX_PICKLE_INT_BITS", "picture_pixel_limit"]

MAX_PICTURE_PIXELS = 8192 * 8192
MAX_PICKLE_ELEMENTS = 25_000_000
MAX_PICKLE_ELEMENTS_PER_BYTE = 4
PICKLE_ELEMENTS_FLOOR = 65_536
MAX_PICKLE_DEPTH = 32
MAX_PICKLE_INT_BITS = 64


def picture_pixel_limit() -> int:
    """The most pixels a dataset picture may have: ``MAX_PICTURE_PIXELS``, or PIL's guard where it is lower."""
    pil = Image.MAX_IMAGE_PIXELS
    return MAX_PICTURE_PIXELS if pil is None else min(MAX_PICTURE_PIXELS, int(pil))
