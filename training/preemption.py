"""Stopping a run cleanly: signals become a flag the training loop polls, all ranks agree on the step to stop at,
and the signal is passed on once the checkpoint is saved.

SIGTERM / SIGUSR1 / SIGUSR2 (SLURM pre-emption, ``scancel --signal``, submitit) and, while training, SIGINT
(Ctrl-C) ask the run to save and stop; a second Ctrl-C aborts at once. A run stopped this way exits with
:data:`rsam.cli.STOPPED`; running the same command again resumes it.
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

LOG = logging.getLogger("rsam.train")


class PreemptionHandler:
    """Turns the stop signals into a flag the loop polls.

    The loop saves a checkpoint and then calls :meth:`forward_signal`, which hands the signal to whatever
    handler was installed before (e.g. submitit's requeue handler), so the job is requeued only after the
    state is on disk. ``step`` (optional) tells the log line at which training step the signal arrived.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2), interrupt: bool = False,
                 step: Optional[Callable[[], int]] = None):
        self.received: Optional[int] = None
        self._step = step
        self._previous: Dict[int, Any] = {}
        for sig in (*signals, signal.SIGINT) if interrupt else signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): no preemption support
                LOG.warning("cannot install a handler for %s outside the main thread", signal.Signals(sig).name)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second request: abort at once, as Ctrl-C normally does
        self.received = signum
        where = f" at step {self._step()}" if self._step is not None else ""
        again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
        LOG.warning("received %s%s: will save a checkpoint and stop%s", signal.Signals(signum).name, where, again)

    def forward_signal(self) -> None:
        """Hand the received signal to the handler installed before ours (Ctrl-C has nobody to tell)."""
        prev = self._previous.get(self.received)
        if callable(prev) and self.received != signal.SIGINT:
            prev(self.received, None)

    def release_interrupt(self) -> None:
        """Give Ctrl-C back its usual meaning (abort), e.g. once nothing is left to save."""
        self.restore((signal.SIGINT,))

    def restore(self, signals=None) -> None:
        """Reinstall the previous handlers of ``signals`` (default: all of ours)."""
        for sig in list(self._previous) if signals is None else [s for s in signals if s in self._previous]:
            prev = self._previous.pop(sig)
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


class StopAgreement:
    """Every rank learns at the same step whether any rank was asked to stop.

    Each :meth:`poll` (once per optimizer step, on every rank) starts an all-reduce of this rank's flag on a
    CPU (gloo) group and reads the one started at the previous step, which finished while this step computed.
    Nothing waits on the GPU, and a signal stops every rank within two steps of its arrival. With one process
    the flag is read directly.
    """

    def __init__(self, handler: PreemptionHandler, world_size: int):
        self.handler = handler
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._flag: Optional[torch.Tensor] = None
        self._work = None

    def poll(self) -> bool:
        """True (on every rank alike) when a stop was requested on some rank."""
        if self.group is None:
            return self.handler.received is not None
        agreed = False
        if self._work is not None:
            self._work.wait()  # a few bytes between CPU processes, done long before: no real wait
            agreed = bool(self._flag.item())
        self._flag = torch.tensor([int(self.handler.received is not None)])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight (every rank started it) before the process group goes."""
        if self._work is not None:
            self._work.wait()
            self._work = None
