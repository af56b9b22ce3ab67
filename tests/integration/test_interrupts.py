"""Ctrl-C and SIGTERM that land inside a write to the study: the run stops, and no trial stays RUNNING.

The signal is real (``signal.raise_signal``); SQLAlchemy's own events place it where it used to break the storage:
right after a statement ran (the write was lost), or as its transaction commits (on SQLite the process kept the
write lock, its next writes failed with "database is locked", and the trial stayed RUNNING). The handler only
records it; the run stops at its next safe point (:mod:`hpo.trial.interrupts`).
"""

import contextlib
import random
import signal
import sys
import threading

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from sqlalchemy import event
from sqlalchemy.engine import Engine

from hpo import load_study
from hpo.study.loop import run_study
from hpo.trial.interrupts import Guard, stop_if_asked

quiet = Console(quiet=True)


@contextlib.contextmanager
def signal_at(sig: int, statement: str, nth: int, moment: str):
    """Raise ``sig`` in this process once the ``nth`` statement that starts with ``statement`` has run
    (``moment`` "statement"), or as the first transaction to commit after it ran ("commit"). Statements count from
    when the run handles SIGTERM: before, the signal would end pytest, and they set the study up."""
    seen, sent = [], []

    def send(*_):  # on the main thread: the heartbeat thread commits too
        if len(seen) >= nth and not sent and threading.current_thread() is threading.main_thread():
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


def reports(steps: int):
    """An objective like hpo's: a storage write per step, and a safe point at each step's end (its StopCallback)."""

    def objective(trial: optuna.Trial) -> float:
        stop_if_asked()  # where hpo's objective begins
        for step in range(steps):
            trial.report(1.0 / (step + 1), step)
            stop_if_asked()
        return 0.0

    return objective


def guarded_run(study: optuna.Study, objective, n_trials: int) -> None:
    with Guard():  # as hpo.study.loop.run_study: a safe point between trials, and one after the last
        for _ in range(n_trials):
            stop_if_asked()
            study.optimize(objective, n_trials=1)
        stop_if_asked()


def test_signals_at_random_moments_of_a_storage_write_loop_never_leave_a_trial_running(tmp_path):
    # Raised where they land (Python's default), 20 of 50 such signals left the trial RUNNING; 33 of 150 in hpo.
    statements = []

    def count(conn, cursor, sql, *_):  # as signal_at counts: once the run handles SIGTERM, on the main thread
        if callable(signal.getsignal(signal.SIGTERM)) and threading.current_thread() is threading.main_thread():
            statements.append(sql)

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")  # one for all: a new one takes ~0.5 s
    event.listen(Engine, "after_cursor_execute", count)
    try:
        guarded_run(study, reports(5), 2)
    finally:
        event.remove(Engine, "after_cursor_execute", count)
    rng, sent = random.Random(0), 0
    for case in range(30):  # in ask, the reports, tell, and between trials; as a statement runs or commits
        sig, moment = rng.choice([signal.SIGINT, signal.SIGTERM]), rng.choice(["statement", "commit"])
        nth, stopped = rng.randint(1, len(statements)), False  # a run's statements vary a little: some never come
        with signal_at(sig, "", nth, moment) as signals:
            try:
                guarded_run(study, reports(5), 2)
            except KeyboardInterrupt:
                stopped = True
        assert stopped == bool(signals), (case, sig, moment, nth)  # never lost
        assert not study.get_trials(states=(TrialState.RUNNING,)), (case, sig, moment, nth)
        sent += bool(signals)
    assert sent >= 20 and len(study.get_trials(states=(TrialState.FAIL,))) >= 10  # most came inside a trial


def test_a_tracer_installed_before_the_run_is_still_installed_after_a_held_back_signal(tmp_path):
    # The Guard that traced frames left none (sys.gettrace() None): coverage and pdb stopped for the process.
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")

    def tracer(frame, event, arg):
        return None

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        with (
            signal_at(signal.SIGINT, "INSERT INTO trial_intermediate_values", 2, "statement") as sent,
            pytest.raises(KeyboardInterrupt),
        ):
            guarded_run(study, reports(10), 1)
        after = sys.gettrace()
    finally:
        sys.settrace(before)
    assert sent and after is tracer
    (stopped,) = study.trials
    assert stopped.state == TrialState.FAIL and len(stopped.intermediate_values) == 2


def test_a_signal_in_a_prompt_stretch_raises_at_once_and_elsewhere_waits_for_a_safe_point():
    from hpo.trial import interrupts

    with Guard():
        signal.raise_signal(signal.SIGTERM)  # recorded only
        assert interrupts.received() == signal.SIGTERM
    after = []

    def prompt_stretch():
        with interrupts.promptly():
            signal.raise_signal(signal.SIGINT)
            after.append("ran on")  # the line the signal must not let run

    with Guard(), pytest.raises(KeyboardInterrupt):
        prompt_stretch()
    assert not after
    assert interrupts.received() is None  # cleared on exit: a second run in this process starts afresh


def _stopped(path) -> optuna.Study:
    with pytest.raises(KeyboardInterrupt):
        run_study(load_study(path), quiet)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert not study.get_trials(states=(TrialState.RUNNING,))
    return study


def _raising_before(monkeypatch, module, name: str, sig: int) -> list:
    """Make ``module.name`` raise ``sig`` in this process as it starts; the list it returns holds True once the
    real call returned."""
    real, returned = getattr(module, name), []

    def call(*args, **kwargs):
        signal.raise_signal(sig)
        result = real(*args, **kwargs)
        returned.append(True)
        return result

    monkeypatch.setattr(module, name, call)
    return returned


def test_a_signal_while_the_model_loads_stops_the_trial_at_once(write_study, monkeypatch):
    # The old Guard raised at once outside storage calls; the stop flag alone waited for the whole load (minutes
    # for a large model), then for the Trainer's first safe point.
    from hpo.trial import finetune

    returned = _raising_before(monkeypatch, finetune, "build_model", signal.SIGINT)
    study = _stopped(write_study(n_trials=3))
    assert not returned
    (trial,) = study.get_trials(states=(TrialState.FAIL,))
    assert trial.user_attrs["fail_reason"] == "interrupted"


def test_a_signal_during_the_test_set_evaluation_stops_it_at_its_next_step(write_study, monkeypatch):
    # Its Trainer had no safe point: Ctrl-C waited for the whole test set, and the trial then ended COMPLETE.
    from conftest import DATA

    from hpo.study import held_out

    returned = _raising_before(monkeypatch, held_out, "evaluate_test", signal.SIGINT)
    data = {"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "test": str(DATA / "eval.csv")}
    study = _stopped(write_study(n_trials=3, data={**data, "max_length": 16}))
    assert not returned
    (trial,) = study.get_trials(states=(TrialState.FAIL,))
    assert trial.user_attrs["fail_reason"] == "interrupted"


def test_the_trainer_stops_at_each_micro_batch_not_only_at_a_steps_end():
    # With gradient_accumulation_steps 64, a step is 64 forward and backward passes: the old Guard raised at once.
    from hpo.trial.checkpoints import StopCallback

    stop = StopCallback()
    with Guard():
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            stop.on_substep_end(None, None, None)


def test_a_prompt_stretch_on_another_thread_leaves_the_main_thread_guarded():
    # The handler raises on the main thread, whatever it is doing there: perhaps a storage write.
    from hpo.trial import interrupts

    inside, leave = threading.Event(), threading.Event()

    def elsewhere():
        with interrupts.promptly():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=elsewhere)
    with Guard():
        thread.start()
        try:
            assert inside.wait(10)
            try:
                signal.raise_signal(signal.SIGINT)  # recorded only: the main thread is in no prompt stretch
            except KeyboardInterrupt:
                pytest.fail("another thread's prompt stretch made the main thread's signal raise")
            assert interrupts.received() == signal.SIGINT
        finally:
            leave.set()
            thread.join()
