"""A tracker's calls on a thread of their own, each waited for until a deadline (:class:`Lane`).

The wait, not the call, is on the caller's thread: a signal lands in the wait and is answered at once, whatever
the tracker is doing (:mod:`hpo.trial.trackers`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from hpo.trial import interrupts


class Unanswered(Exception):
    """A tracker call did not return within its time."""


class Lane:
    """A daemon thread that makes one tracker's calls in order; :meth:`call` waits for one until a deadline.

    The wait, not the call, is on the caller's thread: a signal that comes during it stops the run at once
    (:func:`hpo.trial.interrupts.wait`), and a call that hangs (a server that accepts and never answers) holds
    only this thread, which dies with the process."""

    def __init__(self, name: str):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=f"hpo-{name}", daemon=True).start()

    def _serve(self) -> None:
        while (item := self.calls.get()) is not None:
            fn, args, box, done = item
            try:
                with _quiet():
                    box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who decides
                box.append((False, e))
            done.set()

    def close(self) -> None:
        """The thread ends once its calls are done (at once, if it is idle)."""
        self.calls.put(None)

    def call(self, fn: Callable, *args, deadline: float | None) -> Any:
        """``fn(*args)`` on this lane; raises what it raised, or :class:`Unanswered` past ``deadline`` (None: none)."""
        box: list = []
        done = threading.Event()
        self.calls.put((fn, args, box, done))
        # A safe point: a signal that comes during the wait stops the run now, while the call goes on in its thread.
        if not interrupts.wait(done, None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise Unanswered("no answer within the tracker timeout")
        ok, value = box[0]
        if not ok:
            raise value
        return value


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's INFO lines (it creates its database tables on first use) off; hpo prints its own."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
