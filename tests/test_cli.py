"""The installed ``hpo`` command, run as a user runs it: a real subprocess."""

import os
import subprocess
import sys

import optuna


def hpo(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hpo.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_run_then_rerun_then_raise_the_target(write_study):
    path = write_study(n_trials=2)
    first = hpo("run", path)
    assert first.returncode == 0, first.stderr
    assert "best trial" in first.stdout and f"hpo dashboard {path}" in first.stdout
    again = hpo("run", path)
    assert again.returncode == 0 and "2 finished trial(s)" in again.stdout
    more = hpo("run", path, "n_trials=3", "train.num_train_epochs=1", "--allow-changes")  # a new revision
    assert more.returncode == 0, more.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert len(study.trials) == 3


def test_broken_file_exits_2_with_one_line_and_creates_nothing(write_study):
    path = write_study()
    path.write_text(path.read_text().replace("learning_rate:", "learning_rate: [", 1))
    result = hpo("run", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error {path}:") and "YAML syntax error" in line
    assert not path.with_suffix(".db").exists()
    assert not (path.parent / "outputs").exists()


def test_bad_data_fails_before_the_storage_exists(write_study, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("sentence,label\nhello,a\n")
    path = write_study(data={"train": str(bad), "eval": str(bad)})
    result = hpo("run", path)
    assert result.returncode == 2 and "data.text_column: column 'text' not in train.csv" in result.stderr
    assert not path.with_suffix(".db").exists()


def test_validate(write_study):
    ok = hpo("validate", write_study())
    assert ok.returncode == 0 and "ok" in ok.stdout
    missing = hpo("validate", "no/such/study.yaml")
    assert missing.returncode == 2 and "no/such/study.yaml: cannot read" in missing.stderr


def test_bad_override(write_study):
    result = hpo("validate", write_study(), "n_trials=zero")
    assert result.returncode == 2
    assert result.stderr.strip() == "error <command line>: n_trials: Input should be a valid integer, unable to parse string as an integer"
    result = hpo("validate", write_study(), "n_trials")
    assert result.returncode == 2 and "an override is key.path=value" in result.stderr
