"""Faults with real subprocesses and signals: SIGTERM mid-trial, kill -9 mid-trial, resume."""

import signal

import optuna
import pytest
from optuna.trial import TrialState
from procs import RUN_S, SLOW_EPOCHS, WAIT_S, slow_study, start, wait_for_running, wait_until_stale


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_trial_interrupted_and_a_rerun_resumes(write_study, sig):
    path = slow_study(write_study)
    proc = start(path)
    wait_for_running(f"sqlite:///{path.with_suffix('.db')}")
    proc.send_signal(sig)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130 and "run the same command again to resume" in output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert len(stopped.intermediate_values) < SLOW_EPOCHS, "stopped mid-trial, not after its last epoch"
    assert not study.get_trials(states=(TrialState.RUNNING,))

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    assert complete[0].params == stopped.params  # the interrupted configuration ran first on resume


def test_killed_worker_trial_is_failed_and_retried(write_study, storage_url, request):
    name = f"killed-{request.node.callspec.id}"
    path = slow_study(write_study, heartbeat_interval=1, grace_period=3, storage=storage_url, study=name)
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
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2


def test_a_paused_worker_whose_trial_was_taken_over_says_so_and_goes_on(write_study):
    # A worker paused past the grace period (SIGSTOP, a laptop lid, swapping): another worker fails its trial
    # as stale and retries it. When the paused one resumes, Optuna refuses its result; that was a raw
    # "ValueError: Cannot tell a FAIL trial." traceback and exit 1.
    path = slow_study(write_study, n_trials=1, heartbeat_interval=1, grace_period=3)
    storage = f"sqlite:///{path.with_suffix('.db')}"
    paused = start(path)
    study = wait_for_running(storage)
    (victim,) = study.get_trials(states=(TrialState.RUNNING,))
    paused.send_signal(signal.SIGSTOP)
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
