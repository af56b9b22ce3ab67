"""Ctrl-C and SIGTERM that land inside a write to the study: the run stops, and no trial stays RUNNING.

The signal is real (``signal.raise_signal``); SQLAlchemy's own events place it where it used to break the storage:
right after a statement ran (the write was lost), or as its transaction commits (on SQLite the process kept the
write lock, its next writes failed with "database is locked", and the trial stayed RUNNING).
"""

import contextlib
import signal
import threading

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from sqlalchemy import event
from sqlalchemy.engine import Engine

from hpo import load_study
from hpo.study.loop import run_study
from hpo.trial.interrupts import Guard

quiet = Console(quiet=True)


@contextlib.contextmanager
def signal_at(sig: int, statement: str, nth: int, moment: str):
    """Raise ``sig`` in this process once the ``nth`` statement that starts with ``statement`` has run
    (``moment`` "statement"), or as the transaction that holds it commits ("commit"). Statements count from
    when the run handles SIGTERM: before, the signal would end pytest, and they set the study up."""
    seen, sent = [], []

    def send(*_):  # on the main thread: the heartbeat thread commits too
        if len(seen) == nth and not sent and threading.current_thread() is threading.main_thread():
            sent.append(sig)
            signal.raise_signal(sig)

    def ran(conn, cursor, sql, *_):
        if sql.lstrip().startswith(statement) and callable(signal.getsignal(signal.SIGTERM)):
            seen.append(sql)
            if moment == "statement":
                send()

    event.listen(Engine, "after_cursor_execute", ran)
    event.listen(Engine, "commit", send)  # before the database's commit
    try:
        yield sent
    finally:
        event.remove(Engine, "after_cursor_execute", ran)
        event.remove(Engine, "commit", send)


def interrupted_run(write_study, sig, statement, nth, moment="statement", **changes):
    path = write_study(n_trials=3, train={"num_train_epochs": 4, "seed": 0}, eval_every=1.0, **changes)
    with signal_at(sig, statement, nth, moment) as sent, pytest.raises(KeyboardInterrupt):
        run_study(load_study(path), quiet)
    assert sent, "the signal was sent"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert not study.get_trials(states=(TrialState.RUNNING,))
    return study


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_report_ends_the_trial_interrupted_and_queues_it(write_study, sig):
    study = interrupted_run(write_study, sig, "INSERT INTO trial_intermediate_values", 2)  # trial 0, epoch 2
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    assert stopped.number == 0 and stopped.user_attrs["fail_reason"] == "interrupted"
    assert 2 <= len(stopped.intermediate_values) < 4, "the report that the signal landed in was written"
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == stopped.params


def test_a_signal_inside_the_write_that_completes_a_trial_keeps_it_and_starts_no_other(write_study):
    # Optuna's tell, outside the objective: before, nothing ended the trial. Now it completes, then the run stops.
    study = interrupted_run(write_study, signal.SIGTERM, "UPDATE trials SET state", 1, "commit")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert study.trials[0].value is not None


def test_a_signal_inside_the_write_that_creates_a_trial_fails_it_as_interrupted(write_study):
    study = interrupted_run(write_study, signal.SIGTERM, "INSERT INTO trials", 2, "commit")  # trial 1, Optuna's ask
    assert [t.state for t in study.trials][:2] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[1].user_attrs["fail_reason"] == "interrupted"


def test_a_signal_as_a_queued_trial_starts_queues_its_parameters_again(write_study):
    queued = {"learning_rate": 1e-3, "per_device_train_batch_size": 4}
    # The first state change is Optuna's ask taking the queued trial: WAITING to RUNNING, before it is sampled.
    study = interrupted_run(write_study, signal.SIGTERM, "UPDATE trials SET state", 1, "commit", enqueue=[queued])
    stopped, again = study.trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    assert again.state == TrialState.WAITING and again.system_attrs["fixed_params"] == queued


def test_a_second_ctrl_c_stops_at_once_even_inside_a_storage_call(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    first_held_back = []

    def twice(conn, cursor, sql, *_):
        if sql.lstrip().startswith("INSERT INTO trials"):
            signal.raise_signal(signal.SIGINT)  # held back: a storage call
            first_held_back.append(True)
            signal.raise_signal(signal.SIGINT)  # a person pressing Ctrl-C again wants out now

    event.listen(Engine, "after_cursor_execute", twice)
    try:
        with Guard(), pytest.raises(KeyboardInterrupt, match="a second Ctrl-C"):
            study.ask()
    finally:
        event.remove(Engine, "after_cursor_execute", twice)
    assert first_held_back
