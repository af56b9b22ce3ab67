"""``hpo submit --slurm``: the study's workers as one Slurm job array, each task an ``hpo run`` on its storage.

sbatch with a generated script, not submitit: submitit pickles a Python call into the job, so what runs on the
cluster is no file a person can read, paste into sbatch or change. Here ``--dry-run`` prints the exact script
that is submitted, and the array is an ordinary job that squeue, scancel and scontrol know.

Preemption and the time limit cost nothing. The job asks for SIGUSR1 five minutes before its time runs out
(``--signal=B:USR1@300``); the script passes it to the worker as SIGTERM, on which the worker checkpoints its
running trial at the end of the step (``checkpoint_every``), ends it as interrupted with its parameters queued
again, and stops; the script then requeues its own array task. A preemption's SIGTERM (or ``scontrol
requeue``) reaches the worker the same way and Slurm requeues the job itself (``--requeue``). The next worker
to start takes the queued parameters first and resumes the trial from its checkpoint (``hpo.trial.checkpoints``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hpo.config import StudyConfig
from hpo.errors import ConfigError, Problem

COMMAND_LINE = "<command line>"
# The time-limit warning: a worker gives a multi-process trial's ranks up to 120 s to checkpoint and end
# (hpo.study.distributed.STOP_WAIT_S), then records the trial and requeues; all of it before the limit, after which
# Slurm ends the job as TIMEOUT, which it never requeues.
WARN_BEFORE_END_S = 300
TIMEOUT_S = 60  # an sbatch, squeue or sinfo that hangs (a controller down) is an error, not a hung hpo submit


@dataclass(frozen=True)
class SlurmJob:
    """What ``hpo submit --slurm`` asks for: the workers, and sbatch options by their long name."""

    workers: int = 1
    gpus_per_worker: int = 0
    options: dict[str, str | int | float | bool] = field(default_factory=dict)  # the command line's
    setup: str | None = None


def sbatch_options(cfg: StudyConfig, job: SlurmJob) -> dict[str, str | int | float | bool]:
    """The study file's ``resources.slurm.sbatch``, then the command line's options, which win."""
    options = {**cfg.resources.slurm.sbatch, **{k: v for k, v in job.options.items() if v is not None}}
    if (nodes := cfg.resources.nodes_per_trial) > 1:  # a worker's trials span its allocation's nodes
        options.setdefault("nodes", nodes)
        options.setdefault("ntasks-per-node", 1)
    if job.gpus_per_worker:
        options["gres"] = f"gpu:{job.gpus_per_worker}"  # on each node
    if cfg.resources.processes_per_trial > 1:  # a core per rank at least (a GPU's rank needs one too)
        options.setdefault("cpus-per-task", cfg.resources.processes_per_trial)
    return options


def script(cfg: StudyConfig, job: SlurmJob, run: str) -> str:
    """The batch script of the array: one task per worker, each running ``run`` (an ``hpo run`` shell line)."""
    header = {
        "job-name": re.sub(r"[^\w.-]+", "-", f"hpo-{cfg.study}"),
        "array": f"0-{job.workers - 1}",
        **({"ntasks": 1} if cfg.resources.nodes_per_trial == 1 else {}),
        **sbatch_options(cfg, job),
        "requeue": True,
        "signal": f"B:USR1@{WARN_BEFORE_END_S}",
        "open-mode": "append",
        "export": "ALL",  # the workers read the storage's password from the environment they were submitted in
        "output": str(cfg.output_path / "slurm").replace("%", "%%") + "/%A_%a.out",
        "chdir": os.getcwd(),
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={_quoted(v)}" for k, v in header.items()]
    setup = job.setup or cfg.resources.slurm.setup
    lines += [
        f"# hpo submit: each task of this array is one worker of study {cfg.study}, an `hpo run` on its storage.",
        f"# {WARN_BEFORE_END_S} s before the time limit (USR1) the worker checkpoints its trial and stops, and the",
        "# task goes back in the queue; a preemption's SIGTERM does the same. The next start resumes the trial.",
        'export HPO_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" COLUMNS="${COLUMNS:-160}"  # a log file\'s width',
        'echo "hpo: worker $HPO_JOB on $(hostname), start $((${SLURM_RESTART_COUNT:-0} + 1))"',
        "worker= stop= requeue=",
        'trap \'stop=1 requeue=1; [ -z "$worker" ] || kill -TERM "$worker" 2>/dev/null\' USR1',
        'trap \'stop=1; [ -z "$worker" ] || kill -TERM "$worker" 2>/dev/null\' TERM',
        *([setup] if setup else []),
        "code=130  # stopped before the worker started",
        'if [ -z "$stop" ]; then',
        f"  {run} &",
        "  worker=$!",
        '  [ -z "$stop" ] || kill -TERM "$worker" 2>/dev/null  # a signal came as it started',
        "  while :; do",
        '    wait "$worker"; code=$?',
        '    kill -0 "$worker" 2>/dev/null || break  # else a signal cut the wait short: the worker is stopping',
        "  done",
        '  wait "$worker" 2>/dev/null; last=$?  # its own exit code, if it ended just after a signal cut a wait short',
        '  [ "$last" -eq 127 ] || code=$last',
        "fi",
        'if [ -n "$requeue" ] && [ "$code" -ne 0 ]; then',
        '  echo "hpo: worker $HPO_JOB stopped before the time limit; requeued"',
        '  scontrol requeue "$HPO_JOB"',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def _quoted(value: str | int | float) -> str:
    """An option's value as sbatch reads it from a #SBATCH line: in double quotes when it holds a space."""
    text = str(value)
    return f'"{text}"' if any(c.isspace() for c in text) else text


def check(cfg: StudyConfig, job: SlurmJob, dry_run: bool = False) -> None:
    """What ``hpo submit --slurm`` refuses before it submits anything (a dry run needs no Slurm: it only prints).

    Raises:
        ConfigError: no ``sbatch`` on PATH, a partition Slurm does not have, GPUs fewer than a trial's processes,
            an option that would break the script.
    """
    problems = []
    for name, value in job.options.items():  # the study file's are checked where it is read
        if value is not None and any(c in str(value) for c in '\n\r"'):
            problems.append(Problem(COMMAND_LINE, None, f"--{name}", f"{value!r} is not one line without quotes"))
    if job.gpus_per_worker and job.gpus_per_worker < cfg.resources.processes_per_trial:
        problems.append(
            Problem(
                COMMAND_LINE,
                None,
                "--gpus-per-worker",
                f"{job.gpus_per_worker} GPU(s) for a trial of {cfg.resources.processes_per_trial} processes "
                "(resources.processes_per_trial): one GPU per process",
            )
        )
    if shutil.which("sbatch") is None:
        if not dry_run:
            problems.append(Problem(COMMAND_LINE, None, "--slurm", "sbatch not found: submit from a Slurm login node"))
    elif (partition := sbatch_options(cfg, job).get("partition")) is not None:
        known = _slurm("sinfo", "--noheader", "--format=%R").split()
        if str(partition) not in known:
            message = f"no partition {partition!r} on this cluster (sinfo lists: {', '.join(known) or 'none'})"
            if job.options.get("partition") is not None:
                problems.append(Problem(COMMAND_LINE, None, "--partition", message))
            else:
                problems.append(cfg.problem(("resources", "slurm", "sbatch", "partition"), message))
    if problems:
        raise ConfigError(problems)


def check_shared_storage(cfg: StudyConfig) -> None:
    """A cluster's workers share the study through a database server: SQLite is refused for submission."""
    if cfg.storage_url.startswith("sqlite"):
        raise cfg.error(
            ("storage",),
            "SQLite cannot be shared by a cluster's workers: give the study a PostgreSQL storage "
            "(storage: postgresql://user@host/db, or --storage) to submit it",
        )


def test_only(text: str, env: dict[str, str]) -> None:
    """``sbatch --test-only``: what Slurm would refuse of the script (an account, a QoS, a time over the
    partition's limit, an array over MaxArraySize), asked without submitting it.

    Raises:
        ConfigError: sbatch's own reason.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(text)
        f.flush()
        _slurm("sbatch", "--test-only", f.name, env=env)


def submit(text: str, folder: Path, env: dict[str, str]) -> str:
    """Write the script into ``folder`` and give it to sbatch; the job's id.

    Raises:
        ConfigError: sbatch refused the job (its own message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "submit.sh"
    path.write_text(text)
    return _slurm("sbatch", "--parsable", str(path), env=env).strip().split(";")[0]


def states(ids: list[str]) -> dict[str, str] | None:
    """``{task id: state}`` of the jobs' tasks Slurm still knows (``123_0: RUNNING``); a job it has forgotten is
    missing (finished a while ago). None when Slurm cannot be asked (no squeue here, a controller down)."""
    if not ids:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i %T", f"--jobs={','.join(ids)}"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode and "Invalid job id" not in out.stderr:  # squeue's word for jobs it no longer knows
        return None
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if " " in line)


def _slurm(*command: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            [Problem(COMMAND_LINE, None, "--slurm", f"{command[0]} did not answer in {TIMEOUT_S} s")]
        ) from None
    if done.returncode:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        raise ConfigError([Problem(COMMAND_LINE, None, "--slurm", f"{command[0]}: {why}")])
    return done.stdout
