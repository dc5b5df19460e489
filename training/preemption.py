"""SLURM / manual preemption: signals become a flag the training loop polls, and are passed on once it has saved."""
from __future__ import annotations

import logging
import signal
from typing import Any, Dict, Optional

LOG = logging.getLogger("rsam.train")


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 / SIGUSR2 (SLURM preemption, ``scancel --signal``) into a flag the loop polls.

    The loop saves a checkpoint and then calls :meth:`forward_signal`, which hands the signal to whatever
    handler was installed before (e.g. submitit's requeue handler), so the job is requeued only after the
    state is on disk.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)):
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): no preemption support
                LOG.warning("cannot install a handler for %s outside the main thread", signal.Signals(sig).name)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        LOG.warning("received %s: will save a checkpoint and stop", signal.Signals(signum).name)

    def forward_signal(self) -> None:
        prev = self._previous.get(self.received)
        if callable(prev):
            prev(self.received, None)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
