"""The one error type for problems a user can fix: a bad path, option, config, checkpoint or data file.

Every command prints such an error as one line on stderr and exits 2 (:mod:`rsam.cli`); anything else is a bug
and keeps its traceback. The message names the file, and the field or option, that is wrong. Library callers
can catch it as ``UserError`` or, as before, as ``ValueError``.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with the user's input; ``str(err)`` is one line naming the file and the field or option."""
