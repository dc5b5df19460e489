"""The error every dataset reader raises for bad input: it names the file and the problem."""
from __future__ import annotations

from rsam.errors import UserError

__all__ = ["DataError", "COUNT_KEYS"]

# Kinds of bad input (``DataError.reason``), counted per kind when ``skip_bad_samples`` skips them. All but
# "zero_area" are bad input; "zero_area" counts records skipped by a format's own rule.
COUNT_KEYS = ("missing_file", "image", "json", "field", "size", "description", "no_annotations", "zero_area")


class DataError(UserError):
    """Bad dataset input. ``str(err)`` is ``"<file>: <problem>"``; ``reason`` is one of ``COUNT_KEYS``."""

    def __init__(self, path: str, problem: str, reason: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.reason = path, problem, reason

    def __reduce__(self):  # picklable across processes despite the 3-argument constructor
        return (DataError, (self.path, self.problem, self.reason))
