"""Real ``hpo run`` subprocesses for the fault and worker tests, and waits for their events.

Every wait here is for an event (a trial training, a process gone, a port answering) with a generous
cap: the tests run on busy 2-core laptops too, where a fixed few seconds is not enough.
"""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

WAIT_S = 120  # the cap on every wait for an event: a loaded machine is slow, not stuck
RUN_S = 900  # the cap on a whole `hpo run` of a few trials: a 40-epoch trial took 173 s with the load at 10 on 2 cores


def wait_for(condition, what: str, timeout: float = WAIT_S, poll: float = 0.2):
    """``condition()``'s first truthy value, asked every ``poll`` seconds; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(poll)


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and children inherit it: pytest run with `&` (or by
    # a CI runner that does) would hand `hpo run` an ignored SIGINT, and the Ctrl-C tests would fail for it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(path, *args: str, **env: str) -> subprocess.Popen:
    """``hpo run path *args`` in a subprocess, with SIGINT's default (Ctrl-C works); stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, "-m", "hpo.cli", "run", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        preexec_fn=_default_sigint,
    )


def wait_for_running(storage, name="tiny", timeout=WAIT_S, n=1) -> optuna.Study:
    """The study, once ``n`` of its trials are training (each past its first evaluation)."""

    def training():
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except Exception:  # noqa: BLE001 - no storage or study yet: keep waiting
            return None
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return study if sum(bool(t.intermediate_values) for t in running) >= n else None

    return wait_for(training, f"{n} trial(s) to start training", timeout)


def wait_until_stale(storage_url: str, name: str, number: int, heartbeat_interval: int, grace_period: int) -> None:
    """Until the storage counts trial ``number`` as stale: its last heartbeat is older than the grace period.

    Asks the storage's own check (optuna's ``_get_stale_trial_ids``: the database's clock, which SQLite
    keeps in whole seconds) rather than sleeping past the grace period on the test's clock.
    """
    storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = optuna.load_study(study_name=name, storage=storage)
    trial_id = study.trials[number]._trial_id
    wait_for(lambda: trial_id in storage._get_stale_trial_ids(study._study_id), f"trial {number} to go stale")
    storage.engine.dispose()


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie (exited, not yet reaped by whoever adopted it) does not."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone; or the pid now belongs to someone else's process
        return False
    if not Path("/proc").is_dir():  # no procfs: a zombie looks alive, and the caller's cap fails the wait
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False


def pause_outside_a_write(pid: int, database) -> bool:
    """SIGSTOP process ``pid``; True if it holds no write lock on ``database``, else SIGCONT and False.

    A process stopped inside a write transaction keeps SQLite's one write lock, and no other worker can
    write until it resumes: that is SQLite's locking, not what this test is about (PostgreSQL has none such).
    """
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: stopped(pid), "the worker to stop")  # the signal is delivered asynchronously
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=0.5)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.rollback()
        return True
    except sqlite3.OperationalError:
        os.kill(pid, signal.SIGCONT)
        return False


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T in /proc/PID/stat; the name in parentheses may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"


SLOW_EPOCHS = 40  # of the tiny model: several seconds per trial, long enough to be caught mid-trial
#: For a test whose rerun trains the caught trial again to its end: a signal sent once the first evaluation is
#: in still lands 15 evaluations before the end (the test asserts it did), and the rerun costs 16 epochs, not 40.
CAUGHT_EPOCHS = 16


def slow_study(write_study, epochs: int = SLOW_EPOCHS, **changes):
    """A study file whose trials evaluate once per epoch, ``epochs`` times."""
    return write_study(
        **{"n_trials": 2, "train": {"num_train_epochs": epochs, "seed": 0}, "eval_every": 1.0, **changes}
    )
