"""The ``hpo`` command: in this process through the CLI's library call (tests/inprocess.py), and once as the
installed script, run as a user runs it."""

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import users_folder
from inprocess import hpo

SCRIPT = Path(sys.executable).with_name("hpo")  # the console script pip installed beside this Python


def script(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_the_installed_script_runs_then_reruns_then_raises_the_target(write_study):
    helped = script("--help")
    assert helped.returncode == 0 and "run" in helped.stdout and "dashboard" in helped.stdout, helped.stderr
    path = write_study(n_trials=2)
    first = script("run", path)
    assert first.returncode == 0, first.stderr
    assert "best trial" in first.stdout and f"hpo dashboard {path}" in first.stdout
    again = hpo("run", path)  # the same, in this process
    assert again.returncode == 0 and "2 finished trial(s)" in again.stdout
    more = hpo("run", path, "n_trials=3", "train.num_train_epochs=1", "--allow-changes")  # a new revision
    assert more.returncode == 0, more.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert len(study.trials) == 3


def test_a_storage_url_with_options_reads_back_and_another_programs_database_is_left_alone(write_study, tmp_path):
    path = write_study(n_trials=1)
    url = f"sqlite:///{tmp_path / 'q.db'}?timeout=30"
    assert hpo("run", path, "--storage", url).returncode == 0
    best = hpo("best", path, "--storage", url)  # was "no storage at …?timeout=30"
    assert best.returncode == 0 and "best: trial 0" in best.stdout, best.stdout + best.stderr
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.executescript("CREATE TABLE studies (x INT); CREATE TABLE users (y INT);")
    before = other.read_bytes()
    refused = hpo("run", path, "--storage", f"sqlite:///{other}", f"output_dir={tmp_path / 'other'}")
    assert refused.returncode == 2 and "holds another program's tables (studies, users)" in refused.stderr
    assert other.read_bytes() == before and not list(tmp_path.glob("other.db-*"))  # no WAL switch, no tables


def test_a_study_named_on_the_command_line_is_found_again_the_way_the_run_says(write_study, tmp_path):
    path = write_study(n_trials=1)
    run = hpo("run", path, "study=other", f"output_dir={tmp_path / 'elsewhere'}")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"hpo dashboard {path} study=other output_dir={tmp_path / 'elsewhere'}" in run.stdout
    best = hpo("best", path, "study=other", f"output_dir={tmp_path / 'elsewhere'}")  # took no overrides
    assert best.returncode == 0 and (tmp_path / "elsewhere" / "best.json").is_file(), best.stdout + best.stderr


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
    assert (
        result.stderr.strip()
        == "error <command line>: n_trials: Input should be a valid integer, unable to parse string as an integer"
    )
    result = hpo("validate", write_study(), "n_trials")
    assert result.returncode == 2 and "an override is key.path=value" in result.stderr


def bomb(levels: int) -> str:
    """A YAML alias bomb of 9**levels strings in a few hundred bytes."""
    text = "[&l0 [x, x, x, x, x, x, x, x, x]"
    for i in range(1, levels):
        text += f", &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
    return text + "]"


@pytest.mark.parametrize(
    "value, message",
    [
        (bomb(8), "once aliases are expanded"),
        ("&a [*a]", "recursive alias"),
        ("[" * 2000 + "]" * 2000, "nested deeper than 64 levels"),
    ],
    ids=["alias-bomb", "recursive-alias", "deep-nesting"],
)
def test_overrides_are_read_as_carefully_as_study_files(write_study, value, message):
    from measure import run_measured

    result = run_measured(
        [sys.executable, "-m", "hpo.cli", "validate", str(write_study()), f"train.label_names={value}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"},
        limit_cpu_s=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error <command line>") and message in line and len(line) < 300
    assert result.cpu_s < 5 and result.rss_mib < 300


@pytest.mark.parametrize("kind", ["fifo", "symlink-loop", "folder", "dev-zero"])
def test_a_study_file_that_is_not_a_file_is_one_line(tmp_path, kind):
    path = tmp_path / "study.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait forever for a writer
    elif kind == "symlink-loop":
        path.symlink_to(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path = Path("/dev/zero")  # reading it would fill the memory
    result = hpo("validate", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error {path}: ") and ("not a regular file" in line or "cannot read" in line), line


def test_outputs_that_cannot_be_written_are_one_line(trained_copy, tmp_path):
    path = trained_copy
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for command in (
        ["best", path, "-o", folder],
        ["report", path, "--csv", folder],
        ["best", path, "-o", path / "best.json"],
    ):  # a folder, a folder, under a file
        result = hpo(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error cannot write"), line


def test_best_and_train_say_the_same_when_no_trial_completed(write_study):
    path = write_study(n_trials=1, pruner={"name": "threshold", "upper": 0.0})  # every trial pruned
    assert hpo("run", path).returncode == 0
    for command in (["best", path], ["train", path, "--best"]):
        result = hpo(*command)
        assert result.returncode == 2
        assert (
            result.stderr.strip() == f"error {path}: the study has no complete trial yet"
        )  # not "Record does not exist."
    for number, why in ((0, "trial 0 is PRUNED, not complete"), (7, "the study has no trial 7 (it holds 0 to 0)")):
        result = hpo("best", path, "--trial", str(number))
        assert result.returncode == 2 and result.stderr.strip().startswith(f"error {path}: {why}"), result.stderr


def test_best_exports_any_complete_trial(write_study):
    import json

    import optuna

    path = write_study(n_trials=2)
    assert hpo("run", path).returncode == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    other = max(study.trials, key=lambda t: t.value)  # not the best
    result = hpo("best", path, "--trial", str(other.number))
    assert result.returncode == 0, result.stderr
    written = path.parent / "outputs" / "tiny" / f"trial-{other.number:04d}.json"
    args = json.loads(written.read_text())
    assert args["learning_rate"] == other.params["learning_rate"]
    assert json.loads(written.with_name(f"{written.stem}.model.json").read_text())["trial"] == other.number


def test_reading_commands_create_nothing_in_an_empty_database(write_study, fresh_postgres_url, postgres_admin):
    # hpo report, best and dashboard opened the storage through Optuna, which creates its 13 tables.
    path = write_study(storage=fresh_postgres_url)
    for command in (["report", path], ["best", path], ["dashboard", path, "--port", "1"]):
        result = hpo(*command)
        assert result.returncode == 2 and "no study 'tiny'" in result.stderr, result.stderr
    import psycopg

    with psycopg.connect(fresh_postgres_url.replace("+psycopg", "")) as db:
        assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_a_report_needs_only_read_access(write_study, fresh_postgres_url, postgres_admin, tmp_path):
    # It also writes the study table into the dashboard note; a reporting role that may only read failed on it.
    import psycopg

    path = write_study(n_trials=1, storage=fresh_postgres_url)
    assert hpo("run", path).returncode == 0
    role = f"{fresh_postgres_url.rsplit('/', 1)[1]}_reader"
    postgres_admin.execute(f'CREATE ROLE "{role}" LOGIN')
    as_admin = fresh_postgres_url.replace("+psycopg", "")
    try:
        with psycopg.connect(as_admin) as db:
            db.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        reader = fresh_postgres_url.replace("postgres@", f"{role}@")
        result = hpo("report", path, "--storage", reader, "--csv", tmp_path / "r.csv")
        assert result.returncode == 0, result.stdout + result.stderr
        assert len((tmp_path / "r.csv").read_text().splitlines()) == 2  # a header and the trial
    finally:
        with psycopg.connect(as_admin) as db:
            db.execute(f'DROP OWNED BY "{role}"')  # its grants
        postgres_admin.execute(f'DROP ROLE "{role}"')


def test_command_line_mistakes_are_one_line(write_study, trained_copy):
    path = write_study(n_trials=1)
    gpus = hpo("run", path, "--gpus", "abc")
    assert gpus.returncode == 2 and gpus.stderr.strip() == (
        "error <command line>: --gpus: 'abc' is not a GPU index (0, 1, …) or UUID (GPU-…, MIG-…)"
    )
    workers = hpo("run", path, "--workers", "0")
    assert workers.returncode == 2 and workers.stderr.strip() == (
        "error <command line>: --workers: '0' is not a number of processes (1, 2, …) or auto"
    )
    assert not path.with_suffix(".db").exists()
    path = trained_copy
    twice = hpo("report", path, path)  # its trials would count twice in every z-score
    assert twice.returncode == 2 and twice.stderr.strip() == f"error {path}: the same study is named twice"
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = hpo("dashboard", path, "--port", taken.getsockname()[1])
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    assert busy.stderr.strip().splitlines()[-1].startswith("error cannot serve on 127.0.0.1:")


def test_a_folder_of_the_users_is_never_taken_over(write_study, tmp_path):
    # output_dir at a folder of the user's: the first install moved their best_model/ aside and deleted it, and
    # hpo report overwrote their report/trials.csv
    mine = users_folder(tmp_path / "mine")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    path = write_study(n_trials=1)
    refused = hpo("run", path, f"output_dir={mine}")
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert f"output_dir: {mine} is not empty (best_model/, report/) and hpo did not make it" in line, line
    assert not path.with_suffix(".db").exists()  # nothing created
    assert hpo("run", path).returncode == 0  # the same study, in a folder of its own
    other = write_study("other.yaml", storage=f"sqlite:///{path.with_suffix('.db')}", output_dir=str(mine))
    report = hpo("report", other)  # hpo report takes no overrides: the same study through another file
    assert report.returncode == 2 and "Traceback" not in report.stdout + report.stderr
    (line,) = report.stderr.strip().splitlines()
    assert line.startswith(f"error {other}:") and f"output_dir: {mine} is not empty" in line, line
    best = hpo("best", path, f"output_dir={mine}")
    assert best.returncode == 2 and f"output_dir: {mine} is not empty" in best.stderr, best.stdout + best.stderr
    trained = hpo("train", path, "--best", f"output_dir={mine}")
    assert trained.returncode == 2 and f"output_dir: {mine} is not empty" in trained.stderr, trained.stderr
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before
    final = path.parent / "outputs" / "tiny" / "final_model"  # in hpo's folder, a final_model/ it did not save
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"the user's model")
    trained = hpo("train", path, "--best")
    assert trained.returncode == 2 and f"{final} is not a model hpo saved" in trained.stderr, trained.stderr
    assert [p.name for p in final.iterdir()] == ["model.safetensors"]  # refused before training
    ours = path.parent / "outputs" / "tiny" / "report" / "trials.csv"
    for _ in range(2):  # in its own folder, hpo replaces the report it wrote
        written = hpo("report", path)
        assert written.returncode == 0 and ours.is_file(), written.stdout + written.stderr
