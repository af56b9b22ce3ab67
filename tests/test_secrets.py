"""A ``${...SECRET/TOKEN/KEY/PASSWORD}`` value never reaches a printed line, a written file or the database."""

import os
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import DATA

SECRET = "tok-9f3c2e7a51"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "MY_SECRET_TOKEN": SECRET}


def hpo(*args):
    return subprocess.run([sys.executable, "-m", "hpo.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def test_a_secret_in_a_setting_stays_out_of_tensorboard_artifacts_the_note_and_every_table(write_study):
    # train.run_name reached each trial's TensorBoard events (TrainingArguments as text) in clear.
    path = write_study(n_trials=2, train={"num_train_epochs": 1, "seed": 0, "run_name": "run-${MY_SECRET_TOKEN}"})
    printed = ""
    for command in ("run", "report", "best"):
        result = hpo(command, path)
        assert result.returncode == 0, result.stdout + result.stderr
        printed += result.stdout + result.stderr
    files = [f for f in path.parent.rglob("*") if f.is_file() and f != path]
    events = [f for f in files if "tfevents" in f.name]
    assert events and [f for f in files if "artifacts" in f.parts] and [f for f in files if f.suffix == ".html"]
    assert any(b"run-***" in f.read_bytes() for f in events), "the run name is logged, masked"
    with sqlite3.connect(path.with_suffix(".db")) as db:  # user attrs, system attrs (the dashboard note), params
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = repr([db.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables])
    assert "note" in rows  # optuna-dashboard keeps the study note in the study's system attrs
    assert SECRET not in printed and SECRET not in rows
    leaked = [str(f) for f in files if SECRET.encode() in f.read_bytes()]
    assert not leaked


@pytest.mark.parametrize("changes", [
    {"train": {"num_train_epochs": 1, "optim": "${MY_SECRET_TOKEN}"}},  # a bad value is quoted in its error
    {"data": {"train": "data/${MY_SECRET_TOKEN}.csv", "eval": str(DATA / "eval.csv")}},  # a path is quoted too
], ids=["optim", "data-path"])
def test_a_secret_in_a_bad_value_is_masked_in_the_error(write_study, changes):
    path = write_study(**changes)
    for command in ("validate", "run"):
        result = hpo(command, path)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert SECRET not in result.stdout + result.stderr, line
    assert not path.with_suffix(".db").exists()
