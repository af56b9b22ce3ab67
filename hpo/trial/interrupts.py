"""Ctrl-C and SIGTERM end a run as ``KeyboardInterrupt``, but never in the middle of a write to the study.

Python raises ``KeyboardInterrupt`` at whatever line the main thread is on. Inside a storage call, the write
is lost, or the connection keeps its transaction: on SQLite the process then locks itself (and every other
worker) out, the writes that end the trial (FAIL, ``fail_reason``, its retry queued) fail with "database is
locked", and the trial stays RUNNING. Inside Optuna's own steps around the objective (``ask``, ``tell``, the
callbacks) nothing ends the trial at all. Measured: 33 of 150 interrupts at random moments of a loop of
``trial.report`` on SQLite left the trial RUNNING; none under :class:`Guard`.

So while a run is guarded (:class:`Guard`), a signal that comes while the main thread is in Optuna, SQLAlchemy or a
database driver (:data:`UNSAFE_PACKAGES`) below the objective waits for the outermost such call to return, and is raised in its caller, as if that call had raised it once done. Python offers "now" or
"ignore" for a signal; this handler, which waits for a frame to return (a trace hook on that one frame, the
way debuggers step out), is what no library here does.

- SIGTERM (a scheduler's stop, a preemption notice, the parent of ``--workers`` stopping a worker) counts
  once: a second one (systemd signalling the whole group, then the parent its workers) would interrupt the
  clean-up of the first. A trial that checkpoints answers it with a checkpoint instead (:mod:`hpo.trial.checkpoints`).
- Ctrl-C (SIGINT) waits the same way; a second Ctrl-C stops at once, wherever the run is.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from hpo.trial import checkpoints

#: Top-level packages whose calls a signal must not cut short: the study's storage. Not the trackers (MLflow,
#: W&B): a server that never answers would hold Ctrl-C back for as long; their calls run on threads of their own,
#: which a signal never interrupts, and the run waits for them a bounded time (:mod:`hpo.trial.trackers`).
UNSAFE_PACKAGES = frozenset({"optuna", "optuna_integration", "sqlalchemy", "alembic", "sqlite3", "psycopg", "psycopg2"})

_asked = threading.Event()  # a signal came: the run starts no other trial


def stop_if_asked() -> None:
    """Raise ``KeyboardInterrupt`` if a signal came during the guarded run: where a trial starts, so that it
    starts no other one, even if the interrupt was lost (raised inside a finalizer, which Python ignores) or
    answered with a checkpoint; and the objective's first step, where a signal held back in Optuna's ``ask``
    ends the new trial."""
    if _asked.is_set():
        raise KeyboardInterrupt("signal")


class Guard:
    """Ctrl-C and SIGTERM raise ``KeyboardInterrupt`` only outside storage calls, while the ``with`` block runs.

    ``objective``: the function Optuna calls for each trial. Inside its frames, only the calls of
    :data:`UNSAFE_PACKAGES` hold a signal back; outside them, so does Optuna's code around it (``ask``, ``tell``,
    the callbacks), until Optuna returns or calls the objective, which must begin with :func:`stop_if_asked`
    inside the ``try`` that ends an interrupted trial. Frames outside the ``with`` statement (a caller's) are
    not looked at. A SIGINT that the run was started ignoring (a background job) stays ignored. Main thread
    only (where Python runs signal handlers); elsewhere a no-op.
    """

    def __init__(self, objective: Callable | None = None):
        self.boundary = objective.__code__ if objective is not None else None
        self.previous: dict[int, Callable | int | None] = {}
        self.outer: FrameType | None = None  # the with statement's frame: the walk stops there
        self.pending: int | None = None  # a signal waiting for a storage call to return
        self.hooked: FrameType | None = None  # that call's frame
        self.trace: Callable | None = None  # the thread's trace function before the hook (a debugger's, coverage's)
        self.done = False  # the first signal was raised (or answered with a checkpoint)

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.outer, self.done = sys._getframe(1), False
        checkpoints.clear_stop()
        _asked.clear()
        signals = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signals.append(signal.SIGINT)
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def __exit__(self, *_) -> None:
        self._unhook()
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and (self.done or self.pending is not None):
            self._unhook()
            self.done = True
            raise KeyboardInterrupt("a second Ctrl-C")  # the person wants out now, wherever the run is
        if self.done or self.pending is not None:
            return  # a second SIGTERM
        _asked.set()
        if signum == signal.SIGTERM and checkpoints.stop_requested():  # the trial saves at its step's end, then stops
            self.done = True
            return
        call = self._outermost_unsafe(frame)
        if call is None:
            self.done = True
            raise KeyboardInterrupt(f"signal {signum}")
        self.pending, self.hooked, self.trace = signum, call, sys.gettrace()
        call.f_trace_lines = False  # its return only
        call.f_trace = self._on_return
        sys.settrace(self._on_call)  # tracing on in this thread (else f_trace is never called), for no new frame

    def _outermost_unsafe(self, frame: FrameType | None) -> FrameType | None:
        """The outermost frame of :data:`UNSAFE_PACKAGES` between ``frame`` and the objective (or the ``with``)."""
        found = None
        while frame is not None and frame is not self.outer and frame.f_code is not self.boundary:
            if frame.f_globals.get("__name__", "").partition(".")[0] in UNSAFE_PACKAGES:
                found = frame
            frame = frame.f_back
        return found

    def _on_call(self, frame: FrameType, event: str, arg) -> None:
        if frame.f_code is self.boundary:  # Optuna calls the objective: its stop_if_asked() raises the signal
            self._unhook()
            self.done = True
        return None

    def _on_return(self, frame: FrameType, event: str, arg) -> Callable | None:
        if event != "return" or frame is not self.hooked:
            return self._on_return
        signum = self.pending
        self._unhook()
        self.done = True
        raise KeyboardInterrupt(f"signal {signum}")  # in the caller, as if the call had raised it once done

    def _unhook(self) -> None:
        if self.pending is None:
            return
        self.hooked.f_trace = None
        sys.settrace(self.trace)
        self.pending = self.hooked = None
