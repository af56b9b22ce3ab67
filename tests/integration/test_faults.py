"""Faults with real subprocesses and signals: SIGTERM mid-trial, kill -9 mid-trial, resume."""

import signal

import optuna
import pytest
from optuna.trial import TrialState
from procs import (
    CAUGHT_EPOCHS,
    RUN_S,
    SLOW_EPOCHS,
    WAIT_S,
    pause_outside_a_write,
    slow_study,
    start,
    wait_for,
    wait_for_running,
    wait_until_stale,
)

from hpo.attrs import RETRY_OF


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_trial_interrupted_and_a_rerun_resumes(write_study, sig):
    path = slow_study(write_study, CAUGHT_EPOCHS, n_trials=1)  # the rerun trains one: the interrupted configuration
    proc = start(path)
    wait_for_running(f"sqlite:///{path.with_suffix('.db')}")
    proc.send_signal(sig)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130 and "run the same command again to resume" in output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert len(stopped.intermediate_values) < CAUGHT_EPOCHS, "stopped mid-trial, not after its last epoch"
    assert not study.get_trials(states=(TrialState.RUNNING,))

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    (complete,) = study.get_trials(states=(TrialState.COMPLETE,))
    # the interrupted configuration ran on resume, queued again (not sampled anew: the sampler's seed would
    # give the same first parameters)
    assert complete.params == stopped.params and complete.user_attrs[RETRY_OF] == stopped.number


def test_killed_worker_trial_is_failed_and_retried(write_study, storage_url, request):
    name = f"killed-{request.node.callspec.id}"
    path = slow_study(
        write_study, CAUGHT_EPOCHS, n_trials=1, heartbeat_interval=1, grace_period=3, storage=storage_url, study=name
    )
    proc = start(path)
    study = wait_for_running(storage_url, name)
    (victim,) = study.get_trials(states=(TrialState.RUNNING,))
    proc.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the storage
    proc.wait(timeout=WAIT_S)
    assert optuna.load_study(study_name=name, storage=storage_url).trials[victim.number].state == TrialState.RUNNING
    wait_until_stale(storage_url, name, victim.number, heartbeat_interval=1, grace_period=3)

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert study.trials[victim.number].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == victim.params
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 1  # the retry, and no more


def test_a_paused_worker_whose_trial_was_taken_over_says_so_and_goes_on(write_study):
    # A worker paused past the grace period (SIGSTOP, a laptop lid, swapping): another worker fails its trial
    # as stale and retries it. When the paused one resumes, Optuna refuses its result; that was a raw
    # "ValueError: Cannot tell a FAIL trial." traceback and exit 1.
    path = slow_study(write_study, n_trials=1, heartbeat_interval=1, grace_period=3)
    storage = f"sqlite:///{path.with_suffix('.db')}"
    paused = start(path)
    study = wait_for_running(storage)
    (victim,) = study.get_trials(states=(TrialState.RUNNING,))
    wait_for(lambda: pause_outside_a_write(paused.pid, path.with_suffix(".db")), "a pause that holds no SQLite lock")
    try:
        wait_until_stale(storage, "tiny", victim.number, heartbeat_interval=1, grace_period=3)
        other = start(path, "--n-trials", "2")  # fails the stale trial, runs its retry and one more
        output = other.communicate(timeout=RUN_S)[0]
        assert other.returncode == 0, output
    finally:
        paused.send_signal(signal.SIGCONT)
    output = paused.communicate(timeout=RUN_S)[0]
    assert "Traceback" not in output, output
    assert f"trial {victim.number:3d} taken over" in output and paused.returncode == 0, output


def checkpoint_markers(path) -> list:
    return list((path.parent / "outputs" / "tiny" / "checkpoints").glob("*/checkpoint-*/hpo-complete"))


def test_a_killed_trial_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(write_study):
    from rich.console import Console

    from hpo import load_study
    from hpo.study.loop import run_study

    # One trial, evaluated every epoch, a checkpoint every 4 epochs; killed once one is written.
    path = slow_study(write_study, n_trials=1, heartbeat_interval=1, grace_period=3, checkpoint_every={"epochs": 4})
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path)
    wait_for(lambda: checkpoint_markers(path), "a complete checkpoint")
    proc.kill()
    proc.wait(timeout=WAIT_S)
    study = optuna.load_study(study_name="tiny", storage=storage)
    (victim,) = study.get_trials(states=(TrialState.RUNNING,))
    assert victim.intermediate_values, "killed after its first evaluations"
    wait_until_stale(storage, "tiny", victim.number, heartbeat_interval=1, grace_period=3)

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    (retry,) = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    assert retry.params == victim.params and retry.user_attrs["resumed_from_trial"] == victim.number
    resumed = retry.user_attrs["resumed_from_step"]
    assert resumed > 0 and retry.user_attrs["first_step"] == resumed + 1  # not from step 0
    kept = {s: v for s, v in victim.intermediate_values.items() if s in retry.intermediate_values}
    assert kept and all(retry.intermediate_values[s] == v for s, v in kept.items()), "the curve before the kill"
    assert len(retry.intermediate_values) == SLOW_EPOCHS  # one curve: the old points and the new ones
    assert not (path.parent / "outputs" / "tiny" / "checkpoints").exists(), "removed when the trial ended"

    # The same configuration, never interrupted, ends at the same eval loss.
    again = slow_study(write_study, name="again.yaml", study="again", n_trials=1, enqueue=[victim.params])
    (reference,) = run_study(load_study(again), Console(quiet=True)).trials
    assert retry.value == pytest.approx(reference.value, rel=1e-4)


def test_sigterm_saves_a_checkpoint_that_the_rerun_resumes_from(write_study):
    # checkpoint_every far past the run's end: the only checkpoint is the one SIGTERM asks for.
    path = slow_study(write_study, CAUGHT_EPOCHS, n_trials=1, checkpoint_every={"epochs": 10 * CAUGHT_EPOCHS})
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path)
    wait_for_running(storage)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130, output
    (stopped,) = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert len(checkpoint_markers(path)) == 1

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    (done,) = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["resumed_from_trial"] == stopped.number and done.user_attrs["resumed_from_step"] > 0
    assert len(done.intermediate_values) == CAUGHT_EPOCHS
