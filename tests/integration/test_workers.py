"""hpo run --workers: N processes on one storage, GPU pinning, crashes, Ctrl-C, a killed parent; many nodes."""

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading

import inprocess
import optuna
import psycopg
import pytest
import yaml
from conftest import POSTGRES, study_dict
from optuna.trial import TrialState
from procs import (
    RUN_S,
    SLOW_EPOCHS,
    WAIT_S,
    alive,
    pause_outside_a_write,
    slow_study,
    start,
    wait_for,
    wait_for_running,
)

import hpo.trial.memory
from hpo import load_study
from hpo.study import devices
from hpo.study.devices import auto_workers, gpu_ids, parse_gpus, worker_env

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def sqlite_url(path) -> str:
    return f"sqlite:///{path.with_suffix('.db')}"


def assert_accounted_for(study: optuna.Study, n_trials: int, n_workers: int) -> None:
    """Every trial ended (none RUNNING or lost), the target was met, overshooting by at most n_workers - 1."""
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert {t.state for t in trials} <= {*FINISHED, TrialState.FAIL}
    assert n_trials <= len(study.get_trials(states=FINISHED)) <= n_trials + n_workers - 1


def two_workers_run_trials(proc: subprocess.Popen, path, n_trials: int) -> None:
    """Make sure two workers of ``hpo run --workers`` take part, however late the second one starts.

    A tiny study's trials take tenths of a second: on a busy machine the first worker could run them all
    before another asks for one. So the first worker caught mid-trial (its trial still the last one, outside a
    SQLite write, with trials of the ``n_trials`` left to start) is paused until another worker has started
    a trial. The study file sets a long heartbeat, so the pause never makes its trial stale.
    """
    storage, database = sqlite_url(path), path.with_suffix(".db")

    def trials() -> list:
        try:
            return optuna.load_study(study_name="tiny", storage=storage).trials
        except Exception:  # noqa: BLE001 - no storage or study yet
            return []

    def pids(seen: list) -> set[int]:
        return {t.user_attrs["worker"]["pid"] for t in seen if "worker" in t.user_attrs}

    def caught() -> int | None:
        seen = trials()
        if len(pids(seen)) > 1:
            return -1
        assert proc.poll() is None, "the run ended before a second worker started a trial"
        last = seen[-1:]
        if not last or last[0].state != TrialState.RUNNING or "worker" not in last[0].user_attrs:
            return None
        if last[0].number + 1 >= n_trials:  # the last trial of the target: the other worker would only wait
            return None
        pid = last[0].user_attrs["worker"]["pid"]
        if not pause_outside_a_write(pid, database):
            return None
        now = trials()
        if now[-1].number == last[0].number and now[-1].state == TrialState.RUNNING:
            return pid  # stopped in its trial: the next one is another worker's
        os.kill(pid, signal.SIGCONT)
        return None

    paused = wait_for(caught, "a worker caught mid-trial", timeout=RUN_S)
    if paused == -1:
        return
    try:
        wait_for(lambda: len(pids(trials())) > 1, "a second worker's trial")
    finally:
        os.kill(paused, signal.SIGCONT)


def test_four_local_workers_on_the_default_storage_account_for_every_trial(write_study):
    path = write_study(n_trials=12, train={"num_train_epochs": 1, "seed": 0}, heartbeat_interval=3600)
    proc = start(path, "--workers", "4")
    two_workers_run_trials(proc, path, 12)
    output = proc.communicate(timeout=RUN_S)[0]
    assert proc.returncode == 0, output
    assert "4 workers on CPU" in output and "database is locked" not in output
    study = optuna.load_study(study_name="tiny", storage=sqlite_url(path))
    assert_accounted_for(study, 12, 4)
    assert not study.get_trials(states=(TrialState.FAIL,))
    assert len({repr(t.params) for t in study.trials}) == len(study.trials), "each worker seeds its own sampler"
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(pids) > 1 and len(set(re.findall(r"^(w\d): trial", output, re.M))) == len(pids)
    with contextlib.closing(sqlite3.connect(path.with_suffix(".db"))) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_seeded_study_gives_the_same_trials_with_two_workers_every_time(tmp_path, tiny_model):
    # Batch sizes 2 and 8 make trials of different lengths, so the two workers finish in a different order
    # from run to run; TPE, the median pruner and the duplicate check must not see it (hpo.study.ordered).
    space = {
        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "per_device_train_batch_size": {"type": "categorical", "choices": [2, 8]},
    }
    runs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        path = folder / "study.yaml"
        study = study_dict(
            tiny_model,
            n_trials=10,
            search_space=space,
            sampler={"name": "tpe", "seed": 7, "n_startup_trials": 4},
            pruner={"name": "median", "n_startup_trials": 2},
            enqueue=[{"learning_rate": 0.01, "per_device_train_batch_size": 2}],
            heartbeat_interval=3600,
        )
        path.write_text(yaml.safe_dump(study))
        proc = start(path, "--workers", "2")
        two_workers_run_trials(proc, path, 10)
        output = proc.communicate(timeout=RUN_S)[0]
        assert proc.returncode == 0, output
        trials = optuna.load_study(study_name="tiny", storage=sqlite_url(path)).trials
        assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2, "both workers ran trials"
        # Trials 0-9: two workers may start the 10th and an 11th at the same instant (see assert_accounted_for).
        runs.append([(t.number, t.state, t.params, t.value, t.intermediate_values) for t in trials[:10]])
    assert len(runs[0]) == 10 and runs[0] == runs[1]
    # The start-up trials are the ones one worker (Optuna's sequential search with this seed) draws; a queued
    # trial draws nothing.
    one = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7, n_startup_trials=4))
    one.enqueue_trial({"learning_rate": 0.01, "per_device_train_batch_size": 2})
    distributions = {
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "per_device_train_batch_size": optuna.distributions.CategoricalDistribution([2, 8]),
    }
    drawn = [one.ask(distributions).params for _ in range(4)]
    assert [p for _, _, p, *_ in runs[0][:4]] == drawn
    assert any(state == TrialState.PRUNED for _, state, *_ in runs[0]), "the pruner took part"
    assert len({repr(p) for _, _, p, *_ in runs[0]}) == len(runs[0]), "a batch's trials differ"


@pytest.mark.parametrize(
    "how",
    [
        (("--gpus", "0,1"), {}),
        ((), {"CUDA_VISIBLE_DEVICES": "0,1"}),
        (("--workers", "1"), {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ],
    ids=["named", "visible", "one-worker"],
)
def test_gpus_pins_one_device_per_worker(write_study, how):
    # No GPU here: each worker still gets its CUDA_VISIBLE_DEVICES. Without --gpus every visible GPU gets a
    # worker, and one worker sees one GPU: a process on two would train with DataParallel, its batch doubled.
    args, env = how
    path = write_study(n_trials=12, train={"num_train_epochs": 1, "seed": 0}, heartbeat_interval=3600)
    proc = start(path, *args, **env)
    if args != ("--workers", "1"):
        two_workers_run_trials(proc, path, 12)
    output = proc.communicate(timeout=RUN_S)[0]
    assert proc.returncode == 0, output
    study = optuna.load_study(study_name="tiny", storage=sqlite_url(path))
    devices = {t.user_attrs["worker"]["cuda_visible_devices"] for t in study.trials}
    if args == ("--workers", "1"):
        assert "1 worker on GPU 0" in output and devices == {"0"}
    else:
        assert "2 workers on GPU 0, 1" in output and devices == {"0", "1"}


def test_worker_environment(monkeypatch):
    assert worker_env(2, 4, ["0", "1"])["CUDA_VISIBLE_DEVICES"] == "0"  # round robin over the GPUs
    assert parse_gpus(" 3,5 ") == parse_gpus(["3", 5]) == ["3", "5"] and parse_gpus(0) == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    assert gpu_ids() == ["2", "7"]
    # CUDA's rule: up to the first entry that is no device or repeats one; -1 hides them all.
    for visible, ids in [("-1", []), ("0,0,1", ["0"]), ("1,-1,2", ["1"]), ("MIG-GPU-a1/1/2", ["MIG-GPU-a1/1/2"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpu_ids() == ids
    for bad in ("abc", "", "GPU-", []):
        with pytest.raises(ValueError, match="is not a GPU index"):
            parse_gpus(bad)
    with pytest.raises(ValueError, match="GPU 0 is named twice"):
        parse_gpus("0,1,0")  # two workers, or two ranks of one trial, on one GPU
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_env(0, 2, [])["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))  # a share of the cores


def test_workers_auto(write_study, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = load_study(write_study(n_trials=12))
    assert auto_workers(cfg, []) == 3  # 8 cores, but TPE should learn from at least 4 batches of 12 trials
    assert auto_workers(load_study(write_study(n_trials=100)), []) == 8  # one 1-thread worker per core
    assert auto_workers(cfg, ["0", "1"]) == 2 and auto_workers(load_study(write_study(n_trials=3)), []) == 1
    two = load_study(write_study(n_trials=40, resources={"processes_per_trial": 2}))
    assert auto_workers(two, ["0", "1", "2", "3"]) == 2  # a trial takes two GPUs
    many = load_study(write_study(n_trials=100))
    monkeypatch.setattr(hpo.trial.memory, "available_mb", lambda: 100_000.0)
    assert auto_workers(many, ["0", "1"], per_gpu=3) == 6  # what hpo check measured fits three to a GPU
    assert auto_workers(cfg, ["0", "1"], per_gpu=3) == 3  # still at most n_trials / 4
    assert auto_workers(two, ["0", "1", "2", "3"], per_gpu=3) == 2  # a multi-process trial's ranks: one per GPU
    assert auto_workers(many, ["0", "1"], per_gpu=40) == 8  # a process each: at most one per core
    monkeypatch.setattr(hpo.trial.memory, "available_mb", lambda: 4.5 * devices.GPU_WORKER_HOST_MB)
    assert auto_workers(many, ["0", "1"], per_gpu=3) == 4  # and as many as the host's memory holds


def test_workers_auto_on_cpu_fit_in_memory(write_study, tmp_path, monkeypatch):
    # Each CPU worker trains its own copy of the model: 8 cores with memory for 3 workers run 3, not 8.
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 2**20)  # 1 MiB: 8 MiB + 1 GiB a worker
    (model / "config.json").write_text("{}")
    (model / "shard.bin").symlink_to(tmp_path / "missing-blob")  # a hub cache's unfinished download
    cfg = load_study(write_study(n_trials=100))
    monkeypatch.setattr(hpo.trial.memory, "available_mb", lambda: 3.5 * (8 + 1024))
    assert auto_workers(cfg, [], str(model)) == 3
    assert auto_workers(cfg, ["0", "1"], str(model)) == 2  # GPU workers: their memory is the GPU's
    monkeypatch.setattr(hpo.trial.memory, "available_mb", lambda: 100.0)
    assert auto_workers(cfg, [], str(model)) == 1  # at least one: the trial itself says when it does not fit
    monkeypatch.setattr(hpo.trial.memory, "available_mb", lambda: None)
    assert auto_workers(cfg, [], str(model)) == 8  # the machine does not say: the cores decide
    assert auto_workers(cfg, [], "org/not-a-folder") == 8


def test_a_killed_worker_takes_down_only_itself_and_its_trial_is_retried(write_study):
    path = slow_study(write_study, n_trials=3, heartbeat_interval=1, grace_period=3)
    proc = start(path, "--workers", "2")
    study = wait_for_running(sqlite_url(path))
    victim = study.get_trials(states=(TrialState.RUNNING,))[0]
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)  # as the OOM killer would
    output = proc.communicate(timeout=RUN_S)[0]
    assert proc.returncode == 0, output  # the study reached its target all the same
    assert "was killed by SIGKILL" in output
    study = optuna.load_study(study_name="tiny", storage=sqlite_url(path))
    assert study.trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state in FINISHED and retry.params == victim.params
    # The FAIL is read-only once Optuna marks it: the retry names it, in its attrs and in a line.
    assert retry.user_attrs["retry_of"] == victim.number
    assert f"retries trial {victim.number}, whose worker stopped sending heartbeats" in output
    assert_accounted_for(study, 3, 2)


def test_ctrl_c_stops_every_worker_and_leaves_no_trial_running(write_study):
    path = slow_study(write_study, n_trials=4)
    proc = start(path, "--workers", "2")
    wait_for_running(sqlite_url(path), n=2)  # both workers mid-trial
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130, output
    study = optuna.load_study(study_name="tiny", storage=sqlite_url(path))
    assert not study.get_trials(states=(TrialState.RUNNING,)), output
    stopped = study.get_trials(states=(TrialState.FAIL,))
    assert len(stopped) == 2 and all(t.user_attrs["fail_reason"] == "interrupted" for t in stopped)
    assert all(len(t.intermediate_values) < SLOW_EPOCHS for t in stopped), "stopped mid-trial"
    queued = study.get_trials(states=(TrialState.WAITING,))  # the next run starts with them
    assert sorted(repr(t.system_attrs["fixed_params"]) for t in queued) == sorted(repr(t.params) for t in stopped)


@pytest.mark.parametrize("how", [("--workers", "2"), ("--gpus", "0,1")], ids=["forked", "spawned"])
def test_workers_stop_when_their_parent_is_killed(write_study, how):
    """kill -9 of `hpo run --workers`: each worker ends its trial as interrupted and starts no other."""
    path = slow_study(write_study, n_trials=6)
    proc = start(path, *how)
    study = wait_for_running(sqlite_url(path), n=2)
    running = study.get_trials(states=(TrialState.RUNNING,))
    workers = {t.user_attrs["worker"]["pid"] for t in running}
    started = {t.number for t in study.get_trials(states=(*FINISHED, TrialState.FAIL, TrialState.RUNNING))}
    proc.kill()  # no handler runs: the parent cannot stop its workers
    proc.wait(timeout=WAIT_S)
    output = []  # the workers still write to the pipe: read it, or they block once it is full
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to exit after their parent died")
    finally:
        for pid in filter(alive, workers):  # the old behaviour: orphans that would go on for the whole study
            os.kill(pid, signal.SIGKILL)
    reader.join(timeout=WAIT_S)
    output = "".join(output)
    assert len(workers) == 2, output
    study = optuna.load_study(study_name="tiny", storage=sqlite_url(path))
    assert not study.get_trials(states=(TrialState.RUNNING,)), output
    assert {t.number for t in study.trials if t.state != TrialState.WAITING} == started, "a trial started after"
    for t in running:
        stopped = study.trials[t.number]
        assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted", output
    queued = study.get_trials(states=(TrialState.WAITING,))  # the next run starts with them
    assert sorted(repr(t.system_attrs["fixed_params"]) for t in queued) == sorted(repr(t.params) for t in running)


# A grandchild that watches its parent (as a worker does) and says when SIGTERM reaches it.
WATCHER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM", flush=True), os._exit(0)))
from hpo.study import workers
if sys.argv[2] == "poll":  # as on a platform without prctl
    workers._kernel_signals_parent_death = lambda handler: False
workers.die_with_parent(int(sys.argv[1]))
print("watching", flush=True)
time.sleep(600)
"""
MIDDLE = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize(
    "how, when",
    [("kernel", "watching"), ("kernel", "starting"), ("poll", "watching")],
    ids=["prctl", "parent-died-before-prctl", "polling-fallback"],
)
def test_a_worker_gets_sigterm_when_its_parent_dies(how, when):
    """The worker's side of a killed parent, each way: the kernel's signal, the race before it, the fallback."""
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, WATCHER, how], stdout=subprocess.PIPE, text=True)
    child = int(middle.stdout.readline())
    if when == "watching":  # else the child is still importing hpo when its parent dies
        assert middle.stdout.readline() == "watching\n"
    middle.kill()
    try:
        rest = middle.communicate(timeout=WAIT_S)[0]  # until the grandchild, the last writer, has exited
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
    assert rest.splitlines()[-1:] == ["SIGTERM"], rest


def test_nodes_starting_at_once_join_one_study_on_postgresql(write_study, fresh_postgres_url):
    """Four `hpo run` processes on a database without even optuna's tables: one study, no duplicate enqueue."""
    rule_of_thumb = {"learning_rate": 1e-3, "per_device_train_batch_size": 8}
    path = write_study(n_trials=4, storage=fresh_postgres_url, enqueue=[rule_of_thumb])
    nodes = [start(path) for _ in range(4)]
    outputs = [p.communicate(timeout=RUN_S)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0] * 4, "\n".join(outputs)
    assert optuna.get_all_study_names(storage=fresh_postgres_url) == ["tiny"]
    study = optuna.load_study(study_name="tiny", storage=fresh_postgres_url)
    assert_accounted_for(study, 4, 4)
    assert [t.params for t in study.trials].count(rule_of_thumb) == 1


def test_credentials_are_masked_in_every_line_printed_or_saved(write_study, fresh_postgres_url, postgres_admin):
    """A password in the storage URL and a token from ${VAR}: in no output, no file, no row of the database."""
    password, token = "Pw-4a1d3f9e", "hf_Tok8c2b7e05"
    url = fresh_postgres_url.replace("postgres@", f"postgres:{password}@")  # trust auth: any password works
    path = write_study(n_trials=2, storage="${HPO_STORAGE}", train={"num_train_epochs": 1, "hub_token": "${HF_TOKEN}"})
    env = {"HPO_STORAGE": url, "HF_TOKEN": token}
    printed = ""
    for command in (
        ["run", str(path), "--workers", "2"],
        ["report", str(path)],
        ["best", str(path)],
        ["run", str(path), "output_dir=elsewhere", "--storage", url.replace(":5432/", ":1/")],
    ):  # unreachable: exit 2, one line
        if "--workers" in command:  # worker processes: from a process of its own
            proc = subprocess.run(
                [sys.executable, "-m", "hpo.cli", *command],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
                timeout=RUN_S,
            )
        else:
            proc = inprocess.hpo(*command, env=env)
        printed += proc.stdout + proc.stderr
        assert proc.returncode == (2 if "--storage" in command else 0), proc.stdout + proc.stderr
    assert "postgres:***@" in printed and "cannot open" in printed.splitlines()[-1]
    saved = [f for f in path.parent.rglob("*") if f.is_file() and f != path]
    assert any(f.name == "best.json" for f in saved) and any("tfevents" in f.name for f in saved)
    database = fresh_postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(f"{POSTGRES.rsplit('/', 1)[0]}/{database}") as db:
        tables = [r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = repr([db.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables])
    assert '"hub_token"' in rows or "hub_token" in rows
    for secret in (password, token):
        assert secret not in printed
        assert secret not in rows
        leaked = [f for f in saved if secret.encode() in f.read_bytes()]
        assert not leaked, f"{secret} saved in {leaked}"


def test_workers_stopped_by_failures_say_so_in_one_line_each(write_study, tiny_model, tmp_path):
    # The model's weights file is cut short (validation reads only its config and tokenizer): each spawned
    # worker fails one trial, hits max_failures_in_a_row and stops. It used to print a TrialsFailed traceback
    # per worker, raw Optuna log lines, and call a clean stop a crash.
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    path = write_study(n_trials=2, max_failures_in_a_row=1, model=str(model))
    proc = start(path, "--gpus", "0,1")  # spawned workers: fresh interpreters with Optuna's default logging
    output = proc.communicate(timeout=RUN_S)[0]
    assert proc.returncode == 1, output
    assert "Traceback" not in output and "TrialsFailed" not in output
    assert not re.search(r"^(w\d: )?\[[IWE] \d{4}-", output, re.M), "a raw Optuna log line"
    assert len(re.findall(r"^w\d: stopping: 1 trials failed in a row", output, re.M)) == 2, output
    assert "exited with code" not in output
