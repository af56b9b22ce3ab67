"""hpo submit --slurm on a real one-node Slurm cluster (.ci/slurm starts it): a job array that runs a study on
PostgreSQL, a worker stopped for its time limit or preempted that resumes its trial, and what is refused."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from inprocess import hpo
from optuna.trial import TrialState
from procs import CAUGHT_EPOCHS, RUN_S, slow_study, wait_for

from hpo import load_study
from hpo.api import load
from hpo.clusters import slurm

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
REQUEUE_HOLD_S = 5  # how long a requeued task waits before the test starts it (Slurm's own hold: 121 s)


@pytest.fixture(scope="module")
def cluster():
    """Slurm's commands and a node that takes jobs, or a skip (a failure in CI, where ``CI`` is set)."""
    up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    if not up or not re.search(r"^(idle|mixed|allocated|completing)", up.stdout, re.M):
        if os.environ.get("CI"):
            pytest.fail("no Slurm node up: .ci/slurm starts a one-node cluster")
        pytest.skip("no Slurm here (.ci/slurm starts a one-node cluster)")


def submitted(path: Path, *args: str) -> str:
    """``hpo submit path --slurm *args``; the job id it printed."""
    ran = hpo("submit", str(path), "--slurm", *args, cwd=path.parent)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return re.search(r"submitted Slurm job array (\d+)", ran.stdout)[1]


def queued() -> set[str]:
    """The ids of the jobs Slurm holds now."""
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split())


def wait_until_gone(job: str) -> None:
    wait_for(lambda: not slurm.states([job]), f"Slurm job {job} to end", timeout=RUN_S, poll=1)


def log(path: Path, task: str) -> str:
    return (path.parent / "outputs" / "tiny" / "slurm" / f"{task}.out").read_text()


def test_a_two_worker_array_runs_a_study_on_postgresql(write_study, fresh_postgres_url, cluster):
    path = slow_study(write_study, CAUGHT_EPOCHS, n_trials=4, storage=fresh_postgres_url)
    job = submitted(path, "--workers", "2")
    status = hpo("status", str(path), cwd=path.parent)
    assert f"slurm job {job} (2 worker(s)" in status.stdout, status.stdout
    wait_until_gone(job)

    study = optuna.load_study(study_name="tiny", storage=fresh_postgres_url)
    finished = study.get_trials(states=FINISHED)
    assert 4 <= len(finished) <= 5 and {t.state for t in study.trials} <= set(FINISHED), [t.state for t in study.trials]
    assert {t.user_attrs["worker"]["job"] for t in finished} == {f"{job}_0", f"{job}_1"}, "both workers ran trials"
    for task in (f"{job}_0", f"{job}_1"):
        assert "start 1" in log(path, task) and "Traceback" not in log(path, task), log(path, task)
    after = hpo("status", str(path), cwd=path.parent)
    assert f"{len(finished)} complete" in after.stdout and "no longer queued" in after.stdout, after.stdout


@pytest.mark.parametrize("stop", ["time limit", "preemption"])
def test_a_stopped_worker_requeues_and_resumes_its_trial_from_its_checkpoint(
    write_study, fresh_postgres_url, cluster, stop, tmp_path
):
    path = slow_study(write_study, n_trials=1, storage=fresh_postgres_url, checkpoint_every={"epochs": 4})
    job = submitted(path)
    task = f"{job}_0"
    checkpoints = path.parent / "outputs" / "tiny" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("*/checkpoint-*/hpo-complete")), "a complete checkpoint", timeout=RUN_S)
    if stop == "time limit":  # what --signal=B:USR1@300 sends five minutes before the job's time runs out
        subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=60)
    else:  # the scheduler takes the node back: SIGTERM, and the job goes back in the queue
        subprocess.run(["scontrol", "requeue", task], check=True, timeout=60)

    pending: list[float] = []  # when the test first saw the requeued task pending

    def restarted() -> bool:  # Slurm holds a requeued job for 121 s; the test lets it start after a few
        if slurm.states([job]).get(task) == "PENDING":
            pending[:] = pending or [time.monotonic()]
            # Not at once: a job started again in the second it was requeued is killed by slurmd ("Job credential
            # revoked": its revocation time is in whole seconds), and the array task is then gone for good.
            if time.monotonic() - pending[0] > REQUEUE_HOLD_S:
                subprocess.run(
                    ["scontrol", "update", f"JobId={task}", "StartTime=now"], capture_output=True, timeout=60
                )
        return "start 2" in log(path, task)

    wait_for(restarted, "the requeued worker to start", timeout=RUN_S, poll=1)
    wait_until_gone(job)

    study = optuna.load_study(study_name="tiny", storage=fresh_postgres_url)
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    (done,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert stopped.user_attrs["fail_reason"] == "interrupted", log(path, task)
    assert done.user_attrs["resumed_from_trial"] == stopped.number and done.user_attrs["resumed_from_step"] > 0
    assert done.user_attrs["worker"]["job"] == task
    if stop == "time limit":
        assert "stopped before the time limit; requeued" in log(path, task)

    # The same configuration, never stopped, ends at the same eval loss.
    from rich.console import Console

    from hpo.study.loop import run_study

    again = slow_study(write_study, name="again.yaml", study="again", n_trials=1, enqueue=[stopped.params])
    (reference,) = run_study(load_study(again), Console(quiet=True)).trials
    assert done.value == pytest.approx(reference.value, rel=1e-4)


def test_the_dry_run_prints_the_script_and_submits_nothing(write_study, fresh_postgres_url, cluster):
    path = write_study(storage=fresh_postgres_url)
    before = queued()
    ran = hpo("submit", str(path), "--slurm", "--dry-run", "--workers", "3", "--time", "1:00:00", cwd=path.parent)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("#!/bin/bash\n#SBATCH --job-name=hpo-tiny\n#SBATCH --array=0-2\n")
    assert "#SBATCH --time=1:00:00\n" in ran.stdout and "#SBATCH --signal=B:USR1@300\n" in ran.stdout
    assert f"-m hpo.cli run {path} --workers 1 &\n" in ran.stdout
    assert not queued() - before
    assert not (path.parent / "outputs").exists(), "nothing created"


@pytest.mark.parametrize(
    "args, storage, error",
    [
        (["--partition", "nosuch"], "pg", "<command line>: --partition: no partition 'nosuch' on this cluster"),
        ([], "sqlite", "storage: SQLite cannot be shared by a cluster's workers"),
        ([], "no sbatch", "<command line>: --slurm: sbatch not found: submit from a Slurm login node"),
    ],
)
def test_what_cannot_be_submitted_is_one_line_and_nothing_is_submitted(
    write_study, fresh_postgres_url, cluster, args, storage, error
):
    path = write_study(storage=fresh_postgres_url) if storage != "sqlite" else write_study()
    env = {"PATH": "/nonexistent"} if storage == "no sbatch" else None
    before = queued()
    ran = hpo("submit", str(path), "--slurm", *args, cwd=path.parent, env=env)
    assert ran.returncode == 2 and ran.stdout == "", ran.stdout
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("error ") and error in line, line
    assert not queued() - before, "nothing submitted"
    assert not (path.parent / "outputs").exists()


# The batch script's own logic, run by bash with a stand-in worker and a stand-in scontrol: which signal
# requeues, what exit code the task ends with, and a signal that comes while the setup lines run.
WORKER = "touch started; trap 'exit 130' TERM; while [ ! -e done ]; do sleep 0.1; done"


@pytest.mark.parametrize(
    "signum, during, requeued, code",
    [
        (signal.SIGUSR1, "the worker", True, 130),  # the time limit's warning
        (signal.SIGTERM, "the worker", False, 130),  # a preemption: Slurm requeues the job itself
        (signal.SIGUSR1, "the setup", True, 130),  # the worker never starts
        (None, "the worker", False, 0),  # it finished the study: no requeue
    ],
)
def test_the_batch_script_passes_a_signal_on_and_requeues_on_the_time_limits(
    write_study, tmp_path, monkeypatch, signum, during, requeued, code
):
    monkeypatch.chdir(tmp_path)
    # A setup line still running when the signal comes (a wait that the trap cuts short, however busy the machine).
    setup = (
        {"setup": "touch setup; sleep 600 >/dev/null & echo $! > setup.pid; wait $!"} if during == "the setup" else {}
    )
    cfg = load(write_study(storage="postgresql://db/hpo", resources={"slurm": setup}))
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" > scontrol-args\n')
    scontrol.chmod(0o755)
    (tmp_path / "job.sh").write_text(slurm.script(cfg, slurm.SlurmJob(), shlex.join(["sh", "-c", WORKER])))
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "5"}
    task = subprocess.Popen(
        ["bash", "job.sh"], env={**env, "SLURM_ARRAY_TASK_ID": "0"}, stdout=subprocess.PIPE, text=True
    )
    wait_for(lambda: (tmp_path / ("setup" if during == "the setup" else "started")).exists(), during)
    if signum is None:
        (tmp_path / "done").touch()
    else:
        task.send_signal(signum)
    output = task.communicate(timeout=60)[0]
    if (pid := tmp_path / "setup.pid").exists():
        os.kill(int(pid.read_text()), signal.SIGKILL)  # the setup's sleep, left behind by the stopped task
    assert task.returncode == code, output
    assert (tmp_path / "scontrol-args").exists() == requeued, output
    if requeued:
        assert (tmp_path / "scontrol-args").read_text() == "requeue 5_0\n"
        assert "stopped before the time limit; requeued" in output
    assert (tmp_path / "started").exists() == (during == "the worker")


def test_the_storage_password_stays_out_of_the_script(write_study):
    import hpo
    from hpo.clusters import NO_CHECKPOINTS

    url = "postgresql+psycopg://hpo:s3cret@db.example/hpo"
    for how in ({"storage": url}, {"overrides": {"storage": url, "n_trials": 3}}):
        done = hpo.submit(write_study(storage="postgresql+psycopg://hpo@db.example/hpo"), "slurm", dry_run=True, **how)
        assert "s3cret" not in done.text and done.job_id is None, how  # the workers read it as HPO_STORAGE
        assert done.warnings == [NO_CHECKPOINTS]
    assert "n_trials=3" in done.text
