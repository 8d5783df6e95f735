"""How a training run stops on a signal: the first Ctrl-C (or a scheduler's SIGTERM) asks the run to finish its step,
save and exit with 128 + the signal; a second one stops it at once.

A signal only marks the process that got it. The processes of a multi-process run stop together, after the first
step that ends with any of them marked (``StopRequests.agree``: one tiny all-reduce a step), so one signal to one
rank stops them all, and they all save the same step.
"""
from __future__ import annotations

import signal
import time
from typing import Callable

import torch

from kernels.errors import MinigptError

from .distributed import DistInfo, agreed_stop_signal

# A repeat this soon is the same request delivered twice, not a second one: a terminal sends Ctrl-C to every
# process of the job, and torchrun forwards the signal it got to its workers as well.
SAME_REQUEST_S = 1.0


class StopRequests:
    """The signals a run has received, and whether (and on which signal) it stops.

    ``install()`` when the loop starts, ``agree()`` after every step, ``restore()`` when the loop ends. ``received``
    is this process's first signal; ``signal`` the one the run stops on (every rank's, once they agree), which
    ``requested`` tells is set."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: int | None = None  # this process's first signal
        self.signal: int | None = None  # the signal the run stops on (the exit status is 128 + it)
        self._first_at = 0.0
        self._old_handlers: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        """First signal: mark it (the loop stops after this step). A second one: stop at once, by raising
        KeyboardInterrupt wherever the loop is. Only in the main thread, where Python runs signal handlers."""

        def handler(signum, frame):
            if self.received is None:
                self.received, self._first_at = signum, time.monotonic()
                self.log("stopping after this step (Ctrl-C again to stop at once)")
            elif time.monotonic() - self._first_at > SAME_REQUEST_S:
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def agree(self, dist: DistInfo, device: torch.device) -> None:
        """After every step, on every rank: stop if any rank has received a signal (see agreed_stop_signal)."""
        agreed = agreed_stop_signal(self.received or 0, dist, device)
        if agreed:
            self.signal = agreed

    def stop_now(self) -> None:
        """Stopped at once (a second signal, or another rank gone): the signal to exit with, Ctrl-C's if none came
        (another rank's failure reached this one first)."""
        self.signal = self.signal or self.received or signal.SIGINT

    def lost_a_stopping_rank(self, e: RuntimeError, dist: DistInfo) -> bool:
        """Whether a failed collective most likely means another rank stopped at once: only a rank that was asked
        to stop itself (a signal came, to it or to another rank) reads it so; any other error is the caller's to
        raise."""
        if isinstance(e, (MinigptError, torch.cuda.OutOfMemoryError)):  # a diverged loss, a bad file: not a signal
            return False
        return dist.enabled and (self.received or self.signal) is not None

    def restore(self, dist: DistInfo) -> None:
        """Put back the handlers ``install`` replaced."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if dist.enabled and self.requested and signal.SIGTERM in self._old_handlers:
            # torchrun sends SIGTERM to the other workers as soon as one exits with an error status, as each does
            # here (128 + the signal): a worker that has stopped and is leaving too must not die of it on its way
            # out. SIG_IGN, not a Python handler: the interpreter puts back SIG_DFL for those when it shuts down,
            # and shutting torch down takes long enough for the SIGTERM to land then.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._old_handlers = {}
