"""Past one machine: a study's workers submitted to the scheduler its users already run (Slurm, Kubernetes).

No scheduler of hpo's own: each worker is an ordinary ``hpo run`` on the study's PostgreSQL storage, as on
one machine (:mod:`hpo.study.workers`); the scheduler places them, and preemption is the same SIGTERM a
worker already answers with a checkpoint. hpo writes the job (``--dry-run`` prints it), submits it, and
records its id on the study (:data:`hpo.attrs.CLUSTER_JOBS`) so that ``hpo status`` shows it beside the trials.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from hpo.attrs import CLUSTER_JOBS
from hpo.config import StudyConfig


def worker_command(
    study_file: Path,
    *,
    env: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    installed: bool = False,
    resolve: bool = True,
) -> list[str]:
    """The ``hpo run`` each worker runs: one worker process, the submitting command's ``--env`` and overrides.

    ``installed``: call ``hpo`` from the worker's PATH (a setup line activated an environment), else the
    Python that submits, by its path (a cluster's nodes share the filesystem it is installed on). ``resolve``:
    the study file by its absolute path, else as given (inside a container image).
    """
    hpo = ["hpo"] if installed else [sys.executable, "-m", "hpo.cli"]
    command = [*hpo, "run", str(study_file.resolve() if resolve else study_file), "--workers", "1"]
    if env:
        command += ["--env", env]
    for key, value in (overrides or {}).items():  # back to the command line's key=value, typed by YAML as there
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...")
        command.append(f"{key}={text}")
    return command


def record(study, engine: str, job_id: str, workers: int) -> None:
    """Add a submitted job to the study's :data:`~hpo.attrs.CLUSTER_JOBS`."""
    jobs = list(study.user_attrs.get(CLUSTER_JOBS, []))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    jobs.append({"engine": engine, "id": job_id, "workers": workers, "time": now})
    study.set_user_attr(CLUSTER_JOBS, jobs)


def jobs_with_states(study) -> list[dict[str, Any]]:
    """The study's submitted jobs, each Slurm job with ``tasks``: ``{task id: state}`` of those Slurm still knows
    (None: not known here, a Kubernetes job or a Slurm that cannot be asked)."""
    from hpo.clusters import slurm

    jobs = [dict(j) for j in study.user_attrs.get(CLUSTER_JOBS, [])]
    states = slurm.states([j["id"] for j in jobs if j["engine"] == "slurm"])
    for job in jobs:
        known = states is not None and job["engine"] == "slurm"  # Kubernetes jobs: kubectl get job NAME
        job["tasks"] = {k: v for k, v in states.items() if k.split("_")[0] == job["id"]} if known else None
    return jobs


class Submission(NamedTuple):
    text: str  # the batch script or the Job's YAML, exactly as submitted (or as it would be)
    job_id: str | None  # the scheduler's id; None on a dry run or a Job only written
    warnings: list[str]  # what the submission will not do that a user may expect (resume without checkpoints)


def submit(
    cfg: StudyConfig,
    study_file: Path,
    to: Literal["slurm", "kubernetes"],
    *,
    workers: int = 1,
    gpus_per_worker: int = 0,
    sbatch: Mapping[str, Any] | None = None,
    setup: str | None = None,
    image: str | None = None,
    apply: bool = False,
    dry_run: bool = False,
    env: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    storage: str | None = None,
) -> Submission:
    """Check, then submit the study's ``workers`` (see :func:`hpo.api.submit`). Every check Slurm or Kubernetes
    can make without submitting (``sbatch --test-only``, the kube-config) comes before the study is created;
    nothing is submitted or created when one fails, nor on a dry run.

    Raises:
        ConfigError: the study, its data or model, the storage, or the scheduler's checks (each in one line).
    """
    from hpo.clusters import kubernetes, slurm
    from hpo.data import load_examples
    from hpo.study.loop import start_study
    from hpo.study.storage import check_storage
    from hpo.trial.workbench import prepare

    overrides = {k: v for k, v in (overrides or {}).items() if k != "storage"}  # the URL goes by the environment
    slurm.check_shared_storage(cfg)
    warnings = [] if cfg.checkpoint_every else [NO_CHECKPOINTS]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SBATCH_")}  # they beat #SBATCH lines
    if storage:
        environment["HPO_STORAGE"] = storage  # hpo run's --storage, out of the script and of ps
    if to == "slurm":
        job = slurm.SlurmJob(workers, gpus_per_worker, dict(sbatch or {}), setup)
        slurm.check(cfg, job, dry_run)
        run = worker_command(
            study_file, env=env, overrides=overrides, installed=bool(setup or cfg.resources.slurm.setup)
        )
        text = slurm.script(cfg, job, shlex.join(run))
    else:
        relative = Path(os.path.relpath(study_file.resolve()))
        run = worker_command(relative, env=env, overrides=overrides, installed=True, resolve=False)
        manifest = kubernetes.manifest(cfg, run, workers, gpus_per_worker, image)
        text = yaml.safe_dump(kubernetes.as_dict(manifest), sort_keys=False)
        if not cfg.resources.kubernetes.volume_claim:
            warnings.append(NO_VOLUME)
    bench = prepare(cfg, load_examples(cfg))  # a study that cannot train is refused before it is submitted
    if dry_run or (to == "kubernetes" and not apply):
        return Submission(text, None, warnings)
    check_storage(cfg)
    if to == "slurm":
        slurm.test_only(text, environment)  # the account, the QoS, the time limit, the array's size
    else:
        kubernetes.connect()
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # hpo prints its own lines
    try:
        study, _ = start_study(cfg, bench=bench)  # created before its workers start: the job is recorded on it
    finally:
        optuna.logging.set_verbosity(verbosity)
    job_id = slurm.submit(text, cfg.output_path / "slurm", environment) if to == "slurm" else kubernetes.apply(manifest)
    record(study, to, job_id, workers)
    return Submission(text, job_id, warnings)


NO_CHECKPOINTS = (
    "checkpoint_every is not set: a worker stopped by its time limit or a preemption queues its trial again, "
    "and the trial starts over from its first step"
)
NO_VOLUME = (
    "resources.kubernetes.volume_claim is not set: a pod's checkpoints and outputs are lost with it, and a "
    "preempted trial starts over from its first step"
)
