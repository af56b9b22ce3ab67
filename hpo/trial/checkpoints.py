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
import errno
import hashlib
import json
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hpo.config import StudyConfig
from hpo.trial import interrupts

FULL_BELOW_BYTES = 16 * 2**20  # a disk with less free after a failed save was full (torch's zip writer names no errno)
COMPLETE = "hpo-complete"  # written into a checkpoint folder once the Trainer finished writing it
KEEP = 2  # checkpoints kept per trial: the newest may be cut short by a kill, the one before is whole


def folder(cfg: StudyConfig, params: Mapping[str, Any], revision: int) -> Path:
    """Where the checkpoints of a trial with these parameters go under this revision of the study file: the same
    folder for its retries, another once ``train:`` or the data changed."""
    key = json.dumps({"params": dict(params), "revision": revision}, sort_keys=True, default=str)
    return cfg.output_path / "checkpoints" / hashlib.sha256(key.encode()).hexdigest()[:16]


def claim(where: Path, trial: int, running: Callable[[int], bool]) -> bool:
    """Make ``where`` trial ``trial``'s; False when another trial that is still ``running`` holds it (two trials
    with the same parameters at once: the second runs without checkpoints rather than share them)."""
    owner = where / "owner"
    with contextlib.suppress(OSError, ValueError):
        held = int(owner.read_text())
        if held != trial and running(held):
            return False
    where.mkdir(parents=True, exist_ok=True)
    owner.write_text(f"{trial}\n")
    return True


def clear(where: Path) -> None:
    """Delete the checkpoints in ``where`` (a leftover a new trial must not resume from), keeping its claim."""
    for path in where.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


def latest(where: Path | None) -> Path | None:
    """The newest complete checkpoint in ``where``, or None."""
    if where is None or not where.is_dir():
        return None
    done = [p for p in where.glob("checkpoint-*") if _step(p) is not None and (p / COMPLETE).exists()]
    return max(done, key=_step, default=None)


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


class StopCallback(TrainerCallback):
    """The Trainer's safe points (:mod:`hpo.trial.interrupts`): after Ctrl-C or SIGTERM, it raises
    ``KeyboardInterrupt`` at the start of training, the next step's (or micro-batch's) end or evaluation or
    prediction step.

    ``checkpointing``: the trial saves checkpoints; then a SIGTERM while it trains is left to its
    :class:`CheckpointCallback`, which saves at the step's end and stops training.
    """

    def __init__(self, checkpointing: bool = False):
        self.checkpointing = checkpointing
        self.training = False

    def _check(self) -> None:
        if not (self.checkpointing and self.training and interrupts.received() == signal.SIGTERM):
            interrupts.stop_if_asked()

    def on_train_begin(self, args, state, control, **kwargs):
        interrupts.stop_if_asked()  # a signal while the model loaded: nothing trained yet, no checkpoint to save
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_end(self, args, state, control, **kwargs):
        self._check()

    def on_substep_end(self, args, state, control, **kwargs):
        self._check()  # each micro-batch: with gradient accumulation, a step may be many of them

    def on_prediction_step(self, args, state, control, **kwargs):
        self._check()


class CheckpointCallback(TrainerCallback):
    """Asks the Trainer to save every ``every`` examples seen, and at the step's end when SIGTERM set the stop
    flag (:func:`hpo.trial.interrupts.received`; then it stops training: ``stopped``); marks each checkpoint
    complete once written.

    A checkpoint that cannot be written (a full disk: torch's ``unexpected pos``, safetensors' or an ``OSError``)
    is a warning, not a failed trial: its partial folder is removed, ``on_failure`` is told why once per trial
    (``failed``), and the trial trains on; its retry resumes from an earlier checkpoint, or starts afresh.
    """

    def __init__(self, n_train: int, every: float | None, on_failure: Callable[[str], None] | None = None):
        self.n_train, self.every, self.on_failure = n_train, every, on_failure
        self.stopped = False
        self.failed: str | None = None  # why the first checkpoint that could not be written was not
        self._next = 1

    def write(self, save: Callable[[], None], where: Path, step: int) -> None:
        """Run the Trainer's ``save`` of checkpoint ``where``; one that fails is removed and reported."""
        try:
            save()
        except Exception as e:  # noqa: BLE001 - whatever the writer raised: the trial goes on without this checkpoint
            self._failed(e, where, step)

    def _failed(self, e: Exception, where: Path, step: int) -> None:
        free = shutil.disk_usage(where.parent).free if where.parent.is_dir() else None
        shutil.rmtree(where, ignore_errors=True)  # a partial checkpoint: never resumed from, and its room back
        if self.failed is not None:
            return
        full = _no_space(e) or (free is not None and free < FULL_BELOW_BYTES)
        what = f"the disk holding {where.parent} is full" if full else type(e).__name__
        self.failed = (
            f"checkpoint at step {step} not written ({what}; {str(e).strip()[:200]}): the trial trains on, "
            "and a retry of it resumes from an earlier checkpoint or starts afresh"
        )
        if self.on_failure is not None:
            self.on_failure(self.failed)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every:  # after a resume: the next grid point after the examples already seen
            self._next = int(state.epoch * self.n_train / self.every + 1e-6) + 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.epoch * self.n_train + 1e-6 >= self._next * self.every:
            control.should_save = True
            self._next = int(state.epoch * self.n_train / self.every + 1e-6) + 1
        if _agreed(interrupts.received() == signal.SIGTERM, args.device):
            control.should_save = control.should_training_stop = self.stopped = True

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its part (its RNG state)
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not saved.is_dir():
            return
        try:
            (saved / COMPLETE).write_text(f"{state.global_step}\n")
        except OSError as e:
            self._failed(e, saved, state.global_step)
            return
        # hpo rotates, not the Trainer: the marker goes first, so a kill in the middle of a deletion leaves a
        # folder that is never resumed from (the Trainer's rotation could leave a marked, half-deleted one).
        done = sorted((p for p in Path(args.output_dir).glob("checkpoint-*") if _step(p) is not None), key=_step)
        for old in done[:-KEEP]:
            (old / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


def _agreed(stop: bool, device) -> bool:
    """Whether any rank of a multi-process trial was asked to stop: then all save and stop at this step (a rank
    that saved alone would wait for the others' save forever). One process: ``stop`` itself."""
    if not torch.distributed.is_initialized():
        return stop
    flag = torch.tensor([float(stop)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _no_space(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _step(path: Path) -> int | None:
    return int(path.name.split("-")[1]) if re.fullmatch(r"checkpoint-\d+", path.name) else None
