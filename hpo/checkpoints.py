"""Trials that resume: Trainer checkpoints every ``checkpoint_every`` examples (and on SIGTERM), keyed by the
trial's parameters, so that the retry of a trial whose worker died (kill -9, preemption) or was stopped
continues from the last checkpoint instead of step 0; removed when the trial ends.

A checkpoint is the Trainer's own (model or LoRA adapter, optimizer, scheduler, RNG states, trainer state;
``trainer.train(resume_from_checkpoint=...)`` skips the batches already seen), so what a resumed trial
trains is what the uninterrupted one would have. hpo adds only when to save, where, and a marker written
once a checkpoint is complete: a worker killed while writing leaves a folder that is never resumed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hpo.config import StudyConfig

COMPLETE = "hpo-complete"  # written into a checkpoint folder once the Trainer finished writing it
KEEP = 2  # checkpoints kept per trial: the newest may be cut short by a kill, the one before is whole

#: Set by SIGTERM while a trial that checkpoints is training: it saves at the end of the step, then stops.
_stop = threading.Event()
_training = threading.Event()


def folder(cfg: StudyConfig, params: Mapping[str, Any]) -> Path:
    """Where the checkpoints of a trial with these parameters go: the same folder for its retries."""
    key = hashlib.sha256(json.dumps(dict(params), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cfg.output_path / "checkpoints" / key


def latest(where: Path | None) -> Path | None:
    """The newest complete checkpoint in ``where``, or None."""
    if where is None or not where.is_dir():
        return None
    done = [
        p for p in where.glob("checkpoint-*") if (p / COMPLETE).exists() and re.fullmatch(r"checkpoint-\d+", p.name)
    ]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def examples_seen(checkpoint: Path, n_train: int) -> int:
    """The training examples seen when ``checkpoint`` was saved (its ``trainer_state.json``)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return round(float(state["epoch"]) * n_train)


def remove(where: Path | None) -> None:
    """Delete a trial's checkpoints (it ended), and ``checkpoints/`` when it is left empty."""
    if where is None:
        return
    shutil.rmtree(where, ignore_errors=True)
    with contextlib.suppress(OSError):
        where.parent.rmdir()


def stop_requested() -> bool:
    """Whether a SIGTERM is to be answered with a checkpoint (a trial that checkpoints is training): then
    :class:`CheckpointCallback` saves at the end of the step and the trial ends interrupted."""
    if _training.is_set():
        _stop.set()
        return True
    return False


def clear_stop() -> None:
    """Forget an earlier run's SIGTERM (a new run in the same process)."""
    _stop.clear()


def stopping() -> bool:
    """Whether a SIGTERM asked for a checkpoint: the run starts no other trial."""
    return _stop.is_set()


@contextlib.contextmanager
def training() -> Iterator[None]:
    """While a trial that checkpoints trains: SIGTERM asks for a checkpoint instead of interrupting at once."""
    _training.set()
    try:
        yield
    finally:
        _training.clear()


class CheckpointCallback(TrainerCallback):
    """Asks the Trainer to save every ``every`` examples seen, and at once when SIGTERM asked for it (then
    stops training: ``stopped``); marks each checkpoint complete once written."""

    def __init__(self, n_train: int, every: float | None):
        self.n_train, self.every = n_train, every
        self.stopped = False
        self._next = 1

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every:  # after a resume: the next grid point after the examples already seen
            self._next = int(state.epoch * self.n_train / self.every + 1e-6) + 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.epoch * self.n_train + 1e-6 >= self._next * self.every:
            control.should_save = True
            self._next = int(state.epoch * self.n_train / self.every + 1e-6) + 1
        if _stop.is_set():
            control.should_save = control.should_training_stop = self.stopped = True

    def on_save(self, args, state, control, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if saved.is_dir():
            (saved / COMPLETE).write_text(f"{state.global_step}\n")
