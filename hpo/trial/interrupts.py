"""Ctrl-C and SIGTERM end a run as ``KeyboardInterrupt``, raised only where a trial may safely end.

Python raises ``KeyboardInterrupt`` at whatever line the main thread is on. Inside a storage call, the write
is lost, or the connection keeps its transaction: on SQLite the process then locks itself (and every other
worker) out, the writes that end the trial (FAIL, ``fail_reason``, its retry queued) fail with "database is
locked", and the trial stays RUNNING. Inside Optuna's own steps around the objective (``ask``, ``tell``, the
callbacks) nothing ends the trial at all. Measured: 33 of 150 interrupts at random moments of a loop of
``trial.report`` on SQLite left the trial RUNNING; none under :class:`Guard`.

So while a run is guarded (:class:`Guard`), the signal handler only records the signal: one stop flag,
:func:`received`. hpo's own code checks it at safe points and raises ``KeyboardInterrupt`` there, where the
ordinary ``except`` code ends the trial: a Trainer callback at each step's end and each evaluation or
prediction step (:class:`hpo.trial.checkpoints.StopCallback`), where a trial starts and between trials
(:func:`stop_if_asked`), in the loops that wait for workers, ranks or a tracker (:func:`wait`). Ray Tune and
Lightning do the same; no trace hook, so a debugger's or coverage's tracer stays installed. A stretch with no
storage call and no safe point (a trial's model loading: :func:`promptly`) raises at once, as before.

- SIGTERM (a scheduler's stop, a preemption notice, the parent of ``--workers`` stopping a worker) counts
  once: a second one (systemd signalling the whole group, then the parent its workers) would interrupt the
  clean-up of the first. A trial that checkpoints answers it with a checkpoint first: its
  :class:`hpo.trial.checkpoints.CheckpointCallback` reads the same flag, saves at the step's end and stops.
- Ctrl-C (SIGINT) waits for a safe point the same way; a second Ctrl-C stops at once, wherever the run is.

No third-party import here: the trackers wait through :func:`wait`, and the study's storage reads no torch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

POLL_S = 0.1  # how often a wait that is a safe point looks at the flag

_received: int | None = None  # the stop flag: the signal that asked the guarded run to stop, once it came
_promptly = 0  # > 0: the main thread is in a stretch with no storage call (a model loading): a signal raises at once


def received() -> int | None:
    """The signal (``signal.SIGINT`` or ``signal.SIGTERM``) that asked the guarded run to stop, or None."""
    return _received


def stop_if_asked() -> None:
    """Raise ``KeyboardInterrupt`` if a signal came during the guarded run: where a trial starts (a signal that
    came in Optuna's ``ask`` ends the new trial), between trials (no other one starts, also after a SIGTERM
    answered with a checkpoint), and in the loops that wait for workers or ranks."""
    if _received is not None:
        raise KeyboardInterrupt(f"signal {_received}")


def wait(event: threading.Event, timeout: float | None) -> bool:
    """``event.wait(timeout)`` that a signal coming during it cuts short with ``KeyboardInterrupt`` (a signal
    that came before it, being answered, does not: the clean-up after it waits its whole time)."""
    end = None if timeout is None else time.monotonic() + timeout
    before = _received
    while not event.wait(POLL_S if end is None else max(0.0, min(POLL_S, end - time.monotonic()))):
        if before is None:
            stop_if_asked()
        if end is not None and time.monotonic() >= end:
            return False
    return True


@contextlib.contextmanager
def promptly() -> Iterator[None]:
    """Within the block, a signal raises ``KeyboardInterrupt`` at once, as outside a guarded run.

    For the long stretches of a trial with no safe point and no storage call in them: loading the model takes
    minutes for a large one, and Ctrl-C would wait for all of it, then for the Trainer's first safe point. The
    flag is still set, so the run stops at every later safe point too.
    """
    global _promptly
    stop_if_asked()
    main = threading.current_thread() is threading.main_thread()  # the handler raises there, whatever it runs
    _promptly += main
    try:
        yield
    finally:
        _promptly -= main


class Guard:
    """While the ``with`` block runs, Ctrl-C and SIGTERM only set the stop flag (:func:`received`).

    The flag is cleared on exit, not on entry: a worker forked inside a guarded run inherits its handler, and a
    SIGTERM that reaches it before its own run is guarded (its parent died) stops that run. A SIGINT that the
    run was started ignoring (a background job) stays ignored. Main thread only (where Python runs signal
    handlers); elsewhere a no-op.
    """

    def __init__(self):
        self.previous: dict[int, Callable | int | None] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signals.append(signal.SIGINT)
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def __exit__(self, *_) -> None:
        global _received
        if not self.previous:
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        _received = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _received
        if _received is None:
            _received = signum  # the run stops at its next safe point
            if _promptly:
                raise KeyboardInterrupt(f"signal {signum}")  # no storage call in this stretch: now
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt("a second Ctrl-C")  # the person wants out now, wherever the run is
        # else a second SIGTERM: ignored
