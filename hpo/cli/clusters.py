"""``hpo submit`` and ``hpo status``: a study's workers on a cluster, and where they stand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from hpo import api
from hpo.cli import Env, Overrides, Storage, StudyFile, _fail, _load, _parse_overrides, _storage, app, err
from hpo.errors import ConfigError

Sbatch = typer.Option(help="sbatch's option of the same name (wins over resources.slurm.sbatch).", show_default=False)


@app.command()
def submit(
    study: StudyFile,
    overrides: Overrides = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit the workers as one Slurm job array.")] = False,
    kubernetes: Annotated[
        bool, typer.Option("--kubernetes", help="Write (or --apply) the workers as one Kubernetes Indexed Job.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes: array tasks or pods.")] = 1,
    gpus_per_worker: Annotated[int, typer.Option(min=0, help="GPUs each worker gets (default: none).")] = 0,
    partition: Annotated[str | None, Sbatch] = None,
    time: Annotated[str | None, Sbatch] = None,
    account: Annotated[str | None, Sbatch] = None,
    qos: Annotated[str | None, Sbatch] = None,
    constraint: Annotated[str | None, Sbatch] = None,
    setup: Annotated[
        str | None, typer.Option(help="Shell lines each Slurm worker runs first (a venv, module load).")
    ] = None,
    image: Annotated[str | None, typer.Option(help="Kubernetes: the container image (hpo and the study).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Kubernetes: write the Job's YAML here.")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Kubernetes: create the Job with the kube-config.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be submitted; submit nothing.")] = False,
    env: Env = None,
    storage: Storage = None,
) -> None:
    """Run the study's workers on a cluster: Slurm (--slurm) or Kubernetes (--kubernetes); each is an hpo run on
    the study's PostgreSQL storage, and a preempted one resumes its trial from its checkpoint."""
    if slurm == kubernetes:
        err.print("[red]error[/] <command line>: give one of --slurm and --kubernetes")
        raise typer.Exit(2)
    options = {"partition": partition, "time": time, "account": account, "qos": qos, "constraint": constraint}
    other = {"--image": image, "--out": out, "--apply": apply or None} if slurm else {**options, "setup": setup}
    if given := [k if k.startswith("--") else f"--{k}" for k, v in other.items() if v is not None]:
        err.print(
            f"[red]error[/] <command line>: {', '.join(given)}: not an option of --{'slurm' if slurm else 'kubernetes'}"
        )
        raise typer.Exit(2)
    if out is not None and not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
        err.print(f"[red]error[/] <command line>: --out: cannot write {escape(str(out))}: no such writable folder")
        raise typer.Exit(2)  # before the Job is created, not after
    pairs = _parse_overrides(overrides)
    cfg = _load(study, {**pairs, **_storage(storage)}, env)
    try:
        done = api.submit(
            study,
            "slurm" if slurm else "kubernetes",
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            sbatch={k: v for k, v in options.items() if v is not None},
            setup=setup,
            image=image,
            apply=apply,
            dry_run=dry_run,
            env=env,
            overrides=pairs,
            storage=_storage(storage).get("storage"),
        )
    except ConfigError as e:
        _fail(e)
    console = Console(highlight=False, soft_wrap=True)
    for warning in done.warnings:
        err.print(f"[yellow]warning[/] {escape(warning)}")
    if out is not None:
        out.write_text(done.text)
        console.print(f"wrote {out}")
    if dry_run or (kubernetes and out is None and not apply):
        print(done.text, end="")
    if done.job_id is not None:
        what = "Slurm job array" if slurm else "Kubernetes Job"
        console.print(
            f"submitted {what} {done.job_id}: {workers} worker(s) of {escape(cfg.study)} on {cfg.storage_label}"
        )
        console.print(f"watch it: hpo status {escape(str(study))}" + (f" --env {env}" if env else ""))


@app.command()
def status(study: StudyFile, overrides: Overrides = None, env: Env = None, storage: Storage = None) -> None:
    """The study's trials by state, and the cluster jobs hpo submit started for it with their states."""
    cfg = _load(study, {**_parse_overrides(overrides), **_storage(storage)}, env)
    try:
        counts, jobs = api.status(cfg)
    except ConfigError as e:
        _fail(e)
    console = Console(highlight=False, soft_wrap=True)
    states = ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n) or "no trials yet"
    console.print(f"{escape(cfg.study)} in {escape(cfg.storage_label)}: {states}; target {cfg.n_trials}")
    for job in jobs:
        tasks = job["tasks"]
        if tasks is None:
            where = "state unknown here" if job["engine"] == "slurm" else f"kubectl get job {job['id']}"
        else:
            where = ", ".join(f"{task} {state.lower()}" for task, state in sorted(tasks.items())) or "no longer queued"
        console.print(f"{job['engine']} job {job['id']} ({job['workers']} worker(s), {job['time']}): {where}")
