"""The frame every console script runs in (``rsam-*``, ``training/train.py``, ``training/eval.py``).

    def main(argv=None) -> int:
        return run_command("rsam-export", lambda: export(parse_args(argv)))

Exit statuses, the same for every command:

* 0: done. The body returned ``None`` or 0.
* 1: the run itself failed (the body returned 1, e.g. some images could not be predicted).
* 2: a user error, before or during the run: a :class:`rsam.errors.UserError` (or a missing file), printed as
  one line, ``<command>: error: <message>``; argparse's own usage errors also exit 2.
* 75 (:data:`STOPPED`, sysexits' EX_TEMPFAIL): training saved a checkpoint and stopped before its end (a
  SIGTERM / SIGUSR1 / Ctrl-C, or ``trainer.stop_after_steps``); the same command resumes it (SLURM requeue).
* 130: interrupted with Ctrl-C before the command could stop cleanly.

``RSAM_DEBUG=1`` re-raises user errors with their traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from rsam.errors import UserError

__all__ = ["USAGE", "FAILED", "STOPPED", "INTERRUPTED", "run_command", "user_error_line", "is_user_error"]

FAILED = 1
USAGE = 2
STOPPED = 75
INTERRUPTED = 130


def is_user_error(exc: BaseException) -> bool:
    """A problem with the user's input: our own error type, or a path that is not there."""
    return isinstance(exc, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def user_error_line(exc: BaseException) -> str:
    """The error's message as one line: a message that lists details on further lines (e.g. the keys that do
    not fit) keeps them, joined with "; "."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip().rstrip(":") for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


def run_command(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run ``body`` and turn its outcome into the exit status above."""
    try:
        status = body()
    except SystemExit as exc:  # argparse (--help: 0, bad flag: 2, message printed) or an explicit exit
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(f"{prog}: error: {exc.code}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc) or os.environ.get("RSAM_DEBUG"):
            raise
        print(f"{prog}: error: {user_error_line(exc)}", file=sys.stderr)
        return USAGE
    return 0 if status is None else int(status)
