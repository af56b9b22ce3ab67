"""A ``${...SECRET/TOKEN/KEY/PASSWORD}`` value never reaches a printed line, a written file or the database."""

import json
import sqlite3

import inprocess
import pytest

from tests.conftest import DATA

SECRET = "tok-9f3c2e7a51"


def hpo(*args, secret=SECRET, **env):
    return inprocess.hpo(*args, env={"COLUMNS": "300", "MY_SECRET_TOKEN": secret, **env})


def spellings(secret: str) -> list[bytes]:
    """The secret as written, as JSON escapes it (ASCII or not) and as repr does, in UTF-8."""
    texts = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1]}
    return [t.encode() for t in texts]


@pytest.mark.parametrize("secret", [SECRET, 'sëcrét"Zq9\\x'], ids=["plain", "quote-backslash-accents"])
def test_a_secret_in_a_setting_stays_out_of_tensorboard_artifacts_the_note_and_every_table(write_study, secret):
    # train.run_name reached each trial's TensorBoard events (TrainingArguments as text) in clear, and a
    # secret that JSON escapes (a quote, a backslash, an accent) slipped past the masking of saved configs.
    # A secret now goes only where a library takes a credential (hub_token here); the run name refuses one
    # (test_a_secret_goes_only_where_a_library_takes_a_credential).
    path = write_study(n_trials=2, train={"num_train_epochs": 1, "seed": 0, "hub_token": "${MY_SECRET_TOKEN}"})
    printed = ""
    for command in ("run", "report", "best"):
        result = hpo(command, path, secret=secret)
        assert result.returncode == 0, result.stdout + result.stderr
        printed += result.stdout + result.stderr
    files = [f for f in path.parent.rglob("*") if f.is_file() and f != path]
    events = [f for f in files if "tfevents" in f.name]
    assert events and [f for f in files if "artifacts" in f.parts] and [f for f in files if f.suffix == ".html"]
    assert any(b"hub_token" in f.read_bytes() for f in events), "the training arguments are logged"
    with sqlite3.connect(path.with_suffix(".db")) as db:  # user attrs, system attrs (the dashboard note), params
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = repr([db.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables])
    assert "note" in rows  # optuna-dashboard keeps the study note in the study's system attrs
    for spelling in spellings(secret):
        assert spelling.decode() not in printed and spelling.decode() not in rows
        leaked = [str(f) for f in files if spelling in f.read_bytes()]
        assert not leaked, (spelling, leaked)


@pytest.mark.parametrize(
    "changes",
    [
        {"train": {"num_train_epochs": 1, "optim": "${MY_SECRET_TOKEN}"}},  # a bad value is quoted in its error
        {"data": {"train": "data/${MY_SECRET_TOKEN}.csv", "eval": str(DATA / "eval.csv")}},  # a path is quoted too
    ],
    ids=["optim", "data-path"],
)
def test_a_secret_in_a_bad_value_is_masked_in_the_error(write_study, changes):
    path = write_study(**changes)
    for command in ("validate", "run"):
        result = hpo(command, path)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert SECRET not in result.stdout + result.stderr, line
    assert not path.with_suffix(".db").exists()


def test_a_secret_cannot_name_a_study(write_study):
    # The name is a folder, a database key and the first word of every run: it was printed and saved in clear.
    path = write_study(study="exp-${MY_SECRET_TOKEN}")
    result = hpo("run", path)
    assert result.returncode == 2 and SECRET not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert ": study: ${MY_SECRET_TOKEN} is a secret: it cannot name a study" in line
    assert not path.with_suffix(".db").exists() and not (path.parent / "outputs").exists()


def test_a_password_with_url_characters_is_encoded_and_masked_whole(write_study):
    # postgres:${HPO_DB_PASSWORD}@host with an @ in the password split the URL: "zW9" was printed.
    path = write_study(storage="postgresql+psycopg://postgres:${HPO_DB_PASSWORD}@127.0.0.1:1/nodb")
    for command in ("run", "report"):
        result = hpo(command, path, HPO_DB_PASSWORD="Xy@zW9/q")
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "postgres:***@127.0.0.1:1/nodb" in line, line
        assert "zW9" not in result.stdout + result.stderr and "Xy" not in line


def test_a_hub_token_stays_out_of_a_checkpoint_kept_for_a_resume(write_study):
    # The Trainer pickles its TrainingArguments into each checkpoint (training_args.bin), hub_token in clear; a
    # checkpoint outlives an interrupted trial, so the token lay on disk in the output folder.
    from tests.procs import slow_study, start, wait_for

    train = {"num_train_epochs": 6, "seed": 0, "hub_token": "${MY_SECRET_TOKEN}"}
    path = slow_study(write_study, n_trials=1, checkpoint_every={"epochs": 1}, train=train)
    checkpoints = path.parent / "outputs" / "tiny" / "checkpoints"
    proc = start(path, MY_SECRET_TOKEN=SECRET)
    try:
        wait_for(lambda: list(checkpoints.glob("*/checkpoint-*/hpo-complete")), "a complete checkpoint")
        files = [f for f in checkpoints.rglob("*") if f.is_file()]
        assert any(f.name == "training_args.bin" for f in files), "the Trainer saves its arguments"
        leaked = [str(f) for f in files for s in spellings(SECRET) if s in f.read_bytes()]
        assert not leaked, leaked
    finally:
        proc.kill()
        proc.wait()
