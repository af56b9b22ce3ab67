"""Worker throughput on one machine: python benchmarks/workers.py [--workers 1 4 8] [--postgres URL]

Two loads, each with 1, 4 and 8 worker processes on the default storage (SQLite, WAL) and on
PostgreSQL:

* no-op: every worker runs hpo's own trial loop (open_study, the finished+running check, the
  progress callback) around an objective that only samples the search space with TPE. It measures
  the control plane: storage, sampler, heartbeats. "plain optuna" is the same with Optuna's
  default SQLite settings (rollback journal, 5 s lock timeout, no heartbeats), for comparison.
  Timed from the moment every worker has opened the study (process start-up excluded).
* tiny fine-tune: ``hpo run --workers N`` end to end on a 2-layer, hidden-32 BERT (48 training
  rows, 1 epoch, 2 evaluations per trial). Wall time includes start-up; trials/min counts from
  the first trial's start to the last one's end.

Each row also checks that no trial was lost: every trial is finished or failed, none RUNNING.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
POSTGRES = os.environ.get("HPO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def tiny_study(folder: Path) -> Path:
    """The tests' tiny BERT and data, as a study file in ``folder``."""
    from conftest import build_tiny_bert, study_dict

    study = study_dict(
        build_tiny_bert(folder / "tiny-bert"),
        train={"num_train_epochs": 1, "seed": 0},
        sampler={"name": "tpe", "seed": 0},
    )
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _noop_worker(path: str, overrides: dict, k: int, plain: bool, ready, out) -> None:
    from rich.console import Console

    from hpo import distributions, load_study
    from hpo.study.loop import StopRule, _optimize  # hpo's own loop, without the fine-tune
    from hpo.study.progress import Progress
    from hpo.study.storage import open_study

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = load_study(path, overrides)

    def objective(trial: optuna.Trial) -> float:
        sampled, _ = distributions.sample(trial, cfg.search_space, cfg.distributions, cfg.train)
        return float(sampled["learning_rate"])

    errors = 0
    if plain:
        study = optuna.create_study(
            storage=cfg.storage_url,
            study_name=cfg.study,
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=k),
        )
    else:
        study = open_study(cfg, worker=k)
    ready.wait()
    try:
        if plain:
            study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials)])
        else:
            _optimize(
                study, objective, Progress(Console(quiet=True), cfg, worker=k), StopRule(cfg.max_failures_in_a_row), cfg
            )
    except Exception:  # noqa: BLE001 - "database is locked" ends a plain-optuna worker: counted, not raised
        errors = 1
    out.put(errors)


def noop(path: Path, storage: str, n_workers: int, n_trials: int, plain: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(n_workers + 1), ctx.Queue()
    name = f"noop-{uuid.uuid4().hex[:8]}"
    overrides = {"storage": storage, "study": name, "n_trials": n_trials}
    procs = [
        ctx.Process(target=_noop_worker, args=(str(path), overrides, k, plain, ready, out)) for k in range(n_workers)
    ]
    for p in procs:
        p.start()
    ready.wait()
    t0 = time.perf_counter()
    crashed = sum(out.get() for _ in procs)
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join()
    return {
        "seconds": seconds,
        "trials/s": n_trials / seconds,
        "crashed workers": crashed,
        **_accounting(storage, name, n_trials),
    }


def fine_tune(path: Path, storage: str, n_workers: int, n_trials: int) -> dict:
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpo.cli",
            "run",
            str(path),
            "--workers",
            str(n_workers),
            "--storage",
            storage,
            f"study={name}",
            f"n_trials={n_trials}",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return {"seconds": wall, "trials/min": 60 * len(trials) / span, **_accounting(storage, name, n_trials)}


def _accounting(storage: str, name: str, n_trials: int) -> dict:
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    states = [t.state for t in trials]
    finished = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
    return {
        "finished": finished,
        "failed": states.count(TrialState.FAIL),
        "running": states.count(TrialState.RUNNING),
        "target": n_trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--noop-trials", type=int, default=400)
    parser.add_argument("--fine-tune-trials", type=int, default=24)
    parser.add_argument("--postgres", default=POSTGRES, help="a server where the benchmark may create a database")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    import psycopg

    database = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin, tempfile.TemporaryDirectory() as tmp:
        admin.execute(f'CREATE DATABASE "{database}"')
        try:
            folder = Path(tmp)
            path = tiny_study(folder)
            postgres = (
                args.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
            )
            storages = {"SQLite (WAL)": f"sqlite:///{folder / 'hpo.db'}", "PostgreSQL": postgres}
            print(
                f"{os.cpu_count()} CPU cores; no-op: {args.noop_trials} trials, TPE; "
                f"tiny fine-tune: {args.fine_tune_trials} trials\n"
            )
            print(
                "| load | storage | workers | wall s | throughput | finished/target | failed | running | crashed workers |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            rows = [
                ("no-op", label, n, lambda u=url, n=n: noop(path, u, n, args.noop_trials))
                for label, url in storages.items()
                for n in args.workers
            ]
            rows += [
                (
                    "no-op",
                    "SQLite, plain optuna",
                    n,
                    lambda n=n: noop(path, f"sqlite:///{folder / f'plain{n}.db'}", n, args.noop_trials, plain=True),
                )
                for n in args.workers
            ]
            rows += [
                ("tiny fine-tune", label, n, lambda u=url, n=n: fine_tune(path, u, n, args.fine_tune_trials))
                for label, url in storages.items()
                for n in args.workers
            ]
            for load, label, n, run in rows:
                r = run()
                rate = f"{r['trials/s']:.1f} trials/s" if "trials/s" in r else f"{r['trials/min']:.1f} trials/min"
                print(
                    f"| {load} | {label} | {n} | {r['seconds']:.1f} | {rate} | {r['finished']}/{r['target']} | "
                    f"{r['failed']} | {r['running']} | {r.get('crashed workers', 0)} |",
                    flush=True,
                )
        finally:
            admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
