"""Storage that disappears or fills while a study runs: a SQLite file deleted or replaced, a full disk under the
SQLite file or under the checkpoints. Real ``hpo run`` subprocesses; the disks are small tmpfs mounts (root only)."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState
from procs import RUN_S, slow_study, start, wait_for_running

SHORT = {"num_train_epochs": 12, "seed": 0}  # an evaluation per epoch: caught mid-trial, over in a few minutes


@contextlib.contextmanager
def small_disk(folder, size: str):
    """A tmpfs of ``size`` mounted on ``folder``; skips the test where mounting is not allowed (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small disk needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_recognized_through_optunas_wrapping(write_study, tmp_path):
    # Optuna says "invalid data ... e.g. exceeding max length" for a write that found the disk full.
    from hpo.config import load_study
    from hpo.study.faults import full_disk_reason
    from hpo.study.storage import rdb_storage

    with small_disk(tmp_path / "disk", "1m") as disk:
        cfg = load_study(write_study(storage=f"sqlite:///{disk / 'study.db'}"))
        study = optuna.create_study(study_name="tiny", storage=rdb_storage(cfg))
        fill(disk)
        with pytest.raises(optuna.exceptions.StorageInternalError, match="max length") as raised:
            study.set_user_attr("notes", "x" * 2**20)
        reason = full_disk_reason(raised.value, cfg.storage_label)
        assert reason == f"the disk is full: cannot write the storage {cfg.storage_label} (database or disk is full)"
        assert full_disk_reason(ValueError("max length"), cfg.storage_label) is None


def fill(folder) -> None:
    """Write into ``folder`` until its disk is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"\0")
    except OSError:
        pass
    finally:
        os.close(fd)


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    (line,) = [x for x in output.splitlines() if x.startswith("error ")]
    return line


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_sqlite_file_deleted_or_replaced_mid_run_stops_the_run_in_one_line(write_study, tmp_path, how):
    # SQLite writes on into a deleted file: the run printed every trial complete and a best, exited 0, and lost all.
    path = slow_study(write_study, train=SHORT)
    database = path.with_suffix(".db")
    proc = start(path)
    wait_for_running(f"sqlite:///{database}", timeout=RUN_S)  # a loaded machine starts torch slowly
    if how == "deleted":
        database.unlink()
    else:
        other = tmp_path / "other.db"
        with contextlib.closing(sqlite3.connect(other)) as db:
            db.execute("CREATE TABLE notes (text)")
            db.commit()
        os.replace(other, database)
    output = proc.communicate(timeout=RUN_S)[0]
    assert proc.returncode == 1, output
    line = one_error_line(output)
    assert f"the SQLite file {database} was {how}" in line and "while the study ran" in line, line
    assert "nothing more is written" in line, line
    assert "complete" not in output and "best" not in output, output
    if how == "replaced":  # another program's file: hpo wrote nothing into it
        with contextlib.closing(sqlite3.connect(database)) as db:
            assert [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]


def test_a_full_disk_under_the_sqlite_file_ends_the_trial_in_one_line(write_study, tmp_path):
    # Was: four chained tracebacks ending in Optuna's "AssertionError: Should not reach", a message blaming
    # "max length", and the trial left RUNNING.
    with small_disk(tmp_path / "disk", "4m") as disk:
        database = disk / "study.db"
        path = slow_study(write_study, train=SHORT, storage=f"sqlite:///{database}")
        proc = start(path)
        wait_for_running(f"sqlite:///{database}", timeout=RUN_S)  # a loaded machine starts torch slowly
        fill(disk)
        output = proc.communicate(timeout=RUN_S)[0]
        (disk / "filler").unlink()
        assert proc.returncode == 1, output
        line = one_error_line(output)
        assert "the disk is full" in line and str(database) in line, line
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{database}")
        (trial,) = study.trials
        if "ended FAIL" in line:
            assert trial.state == TrialState.FAIL
            assert trial.user_attrs["fail_reason"].startswith("the disk is full"), trial.user_attrs
        else:  # the storage could not take even the trial's end: the line says so
            assert "stays RUNNING" in line and trial.state == TrialState.RUNNING, line


def test_a_checkpoint_that_cannot_be_written_is_a_warning_and_the_trial_trains_on(write_study, tmp_path):
    # Was: every trial failed with torch's "inline_container.cc:672 unexpected pos", the run stopped, the disk
    # never named. The outputs (checkpoints, TensorBoard, best_model/) are on a disk too small for a checkpoint
    # (~300 KB: the model, the optimizer's state, the RNG states), not for the rest.
    with small_disk(tmp_path / "outputs", "200k") as disk:
        path = slow_study(
            write_study, n_trials=1, train={"num_train_epochs": 6, "seed": 0}, output_dir=str(disk), checkpoint_every=2
        )
        proc = start(path, COLUMNS="300")
        output = proc.communicate(timeout=RUN_S)[0]
        assert proc.returncode == 0, output
        assert "Traceback" not in output and "unexpected pos" not in output.split("warning")[0], output
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
        (trial,) = study.trials
        assert trial.state == TrialState.COMPLETE, trial.user_attrs
        why = trial.user_attrs["checkpoint_error"]
        assert f"the disk holding {disk / 'checkpoints'}" in why and "is full" in why, why
        assert "warning: checkpoint at step" in output, output
        assert output.count("checkpoint at step") == 1, output  # once per trial
        assert not list(disk.glob("checkpoints/*/checkpoint-*")), "the partial checkpoint is removed"


def delete_mid_run(proc: subprocess.Popen, storage_url: str, name: str) -> None:
    """Delete the study while the run goes on. On PostgreSQL the run's writes take share locks on the study's row
    all the time (each trial row's foreign key), and a waiting DELETE may never get past them: new share lockers join
    the ones holding it. On a busy machine the deletion then landed after the 50th trial (twice in 4 parallel runs).
    So the run is paused (SIGSTOP) for each try, and a try that meets a lock it holds gives up after a second."""
    if not storage_url.startswith("postgresql"):
        optuna.delete_study(study_name=name, storage=storage_url)
        return
    storage = optuna.storages.RDBStorage(
        storage_url, engine_kwargs={"connect_args": {"options": "-c lock_timeout=1000"}}
    )
    for _ in range(60):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            optuna.delete_study(study_name=name, storage=storage)
            return
        except sqlalchemy.exc.OperationalError:  # the paused run held a lock: let it go on a moment
            pass
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.5)
    pytest.fail("the study could not be deleted in 60 tries: the run holds a lock the whole time")


def test_a_study_deleted_mid_trial_stops_the_run_in_one_line(write_study, storage_url, request):
    # The study deleted while a trial trains (its rows go with it): the trial's next write or its tell failed
    # first, with Optuna's own error and a traceback, before the watch at the boundary could say what happened.
    name = f"mid-{request.node.callspec.id}"
    # Many trials: on an idle machine a trial is over in ~2 s, before the deletion lands; the run must then stop at
    # the next trial's boundary, or in its first write, and never train the rest into a study that is gone.
    path = slow_study(write_study, train=SHORT, storage=storage_url, study=name, n_trials=50)
    proc = start(path)
    wait_for_running(storage_url, name=name, timeout=RUN_S)
    delete_mid_run(proc, storage_url, name)
    output = proc.communicate(timeout=RUN_S)[0]
    assert proc.returncode == 1, output
    line = one_error_line(output)
    assert f"the study '{name}' was deleted" in line and "while the study ran" in line, line
