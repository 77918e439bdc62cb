"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM, what SLURM and most cluster
schedulers send before they preempt or time out a job.

While :func:`handling` is active (the whole pipeline), either signal is a stop request. Inside
:func:`deferred` (the training loop) the first one only sets :func:`requested`; the loop
finishes its step, writes a checkpoint and raises :class:`Interrupted`, so the run can
continue exactly with ``resume=auto``. Anywhere else, or at a second signal, the run raises
:class:`Interrupted` at once. The CLI prints it as one line and exits with 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by ``signum``. A BaseException, as KeyboardInterrupt is: no
    ``except Exception`` (a sweep's per-job error handling, W&B's guards) swallows it.

    ``step``: the last training step done (None outside training); ``checkpoint``: the
    newest checkpoint, if any; ``stage``: the stage it stopped in; ``resume``: the command
    that continues. Those who know them fill them in on the way up (trainer, pipeline)."""

    def __init__(
        self,
        signum: int,
        step: int | None = None,
        checkpoint: Path | None = None,
        resume: str | None = None,
        stage: str | None = None,
    ) -> None:
        self.signum, self.step, self.checkpoint, self.resume = signum, step, checkpoint, resume
        self.stage = stage
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def message(self) -> str:
        """The one line the CLI prints."""
        if self.step is not None:
            where = f"at step {self.step}"
        else:
            where = f"during {self.stage}" if self.stage else "before the first stage"
        if self.checkpoint is not None:
            saved = f"checkpoint {self.checkpoint}"
        else:
            saved = "no checkpoint written"
        line = f"stopped by {self.name} {where}; {saved}"
        return line + (f"; resume with: {self.resume}" if self.resume else "")


class _State:
    def __init__(self) -> None:
        self.signum: int | None = None  # the pending stop request
        self.defer = False  # inside the training loop: stop at the step boundary


_STATE = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _STATE.defer and _STATE.signum is None:
        _STATE.signum = signum
        log.warning(
            "%s: stopping after this step and writing a checkpoint (%s again stops at once)",
            signal.Signals(signum).name,
            signal.Signals(signum).name,
        )
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (or request a stop inside
    :func:`deferred`) within the block; the previous handlers come back after it. A no-op
    off the main thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _STATE.signum = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STATE.signum, _STATE.defer = None, False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a first signal only sets :func:`requested`."""
    _STATE.defer = True
    try:
        yield
    finally:
        _STATE.defer = False


def requested() -> int | None:
    """The signal number of a pending stop request, else None."""
    return _STATE.signum


def request(signum: int) -> None:
    """Record a stop request as a signal would (a process told by another, e.g. a rank)."""
    _STATE.signum = signum
