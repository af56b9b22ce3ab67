"""Real ``hpo run`` subprocesses for the fault and worker tests."""

import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState


def start(path, *args: str, **env: str) -> subprocess.Popen:
    """``hpo run path *args`` in a subprocess; stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", str(path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def wait_for_running(storage, name="tiny", timeout=120) -> optuna.Study:
    """The study, once one of its trials is training (past its first evaluation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running and running[0].intermediate_values:  # training, past its first evaluation
                return study
        except Exception:  # no storage or study yet
            pass
        time.sleep(0.2)
    pytest.fail("no trial started training in time")


def slow_study(write_study, **changes):
    # 40 epochs of the tiny model: several seconds per trial, long enough to be caught mid-trial
    return write_study(**{"n_trials": 2, "train": {"num_train_epochs": 40, "seed": 0}, "eval_every": 1.0, **changes})
