"""hpo from Python: each command of the CLI is one call here.

A study is a file path, a dict shaped like a study file, or a loaded :class:`~hpo.config.StudyConfig`.
Calls raise :class:`~hpo.errors.ConfigError` for anything wrong with the study (every problem, each naming
its key), print only through the ``console`` they are given, and leave the process's logging and warning
settings as they found them.

>>> import hpo
>>> study = hpo.run("studies/quickstart.yaml", n_trials=8)  # doctest: +SKIP
>>> trials, studies = hpo.report(["studies/quickstart.yaml"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from hpo.config import StudyConfig, load_study
from hpo.config.load import plain
from hpo.errors import ConfigError, Problem, TrialsFailed
from hpo.study.devices import auto_workers, gpu_ids, measured_workers_per_gpu, parse_gpus

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from rich.console import Console

Study = str | Path | Mapping[str, Any] | StudyConfig


ARGUMENTS = "<arguments>"  # how problems name the keyword arguments of these calls


def load(study: Study, overrides: Mapping[str, Any] | None = None, env: str | None = None) -> StudyConfig:
    """The study, validated: a ``StudyConfig`` as it is, a path or a dict through :func:`hpo.config.load_study`.

    ``overrides`` are dotted key paths, as on the command line (``{"train.num_train_epochs": 1}``); their
    problems name ``<arguments>``. A relative SQLite ``storage`` in them is relative to the current folder.

    Raises:
        ConfigError: every problem of the study file (or dict).
        TypeError: overrides or ``env`` with a loaded ``StudyConfig``, which is used as it is.
    """
    if isinstance(study, StudyConfig):
        if overrides or env:
            given = ", ".join([*(overrides or {}), *(["env"] if env else [])])
            raise TypeError(
                f"{given}: a loaded StudyConfig is used as it is; give the study as a file or dict to change it"
            )
        return study
    overrides = plain(dict(overrides or {}), ARGUMENTS)
    return load_study(study, overrides, env, overrides_label=ARGUMENTS)


def validate(study: Study, overrides: Mapping[str, Any] | None = None, env: str | None = None) -> StudyConfig:
    """Check a study without training: the file, its data (every row), the model and the training settings, and
    what :func:`run` checks before it creates anything (:func:`hpo.study.workers.check_before_run`: this machine's cores
    or GPUs for ``resources.processes_per_trial``, the output folder, the storage), creating nothing.

    Returns the loaded study. Raises:
        ConfigError: every problem found, each naming its file, line and key (or data file and row).
    """
    cfg = load(study, overrides, env)
    examples = _examples(cfg)
    from hpo.study.workers import check_before_run
    from hpo.trial.workbench import prepare

    prepare(cfg, examples)
    check_before_run(cfg)  # the check hpo.run makes before it creates anything: one worker, the visible GPUs
    return cfg


def check(study: Study, overrides: Mapping[str, Any] | None = None, env: str | None = None):
    """Measure the study's hungriest and cheapest corners on this device: peak memory, its breakdown, and time.

    Returns a :class:`hpo.trial.preflight.CheckReport` (``.fits``, ``.as_json()``); writes nothing to the storage.

    Raises:
        ConfigError: every problem of the study, its data or its model.
        hpo.trial.preflight.CheckFailed: a corner's steps failed for another reason than memory.
    """
    cfg = load(study, overrides, env)
    from hpo.trial.preflight import check as measure
    from hpo.trial.workbench import prepare, quiet

    bench = prepare(cfg, _examples(cfg))
    with quiet():
        return measure(cfg, bench)


def run(
    study: Study,
    n_trials: int | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: str | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    workers: int | Literal["auto"] | None = None,
    gpus: str | Sequence[str] | None = None,
    allow_changes: bool = False,
    console: Console | None = None,
) -> optuna.Study:
    """Create or resume the study and run trials until it holds ``n_trials`` finished ones; returns it.

    ``workers`` processes share the study on this machine (default: one per GPU, those in ``gpus`` or else every
    visible one, per ``resources.processes_per_trial``; without GPUs 1; ``"auto"``:
    :func:`hpo.study.devices.auto_workers`); with a sampler seed they give the same trials on every run
    (:mod:`hpo.study.ordered`) for the same number of them; ``gpus`` (``"0,1"`` or a list) spreads them round
    robin. A worker never sees more GPUs than its trial uses: one process on two would train with
    DataParallel, its batch silently doubled. ``allow_changes`` records a study file that changed what its
    trials mean as a new revision instead of refusing it (see :mod:`hpo.study.revisions`).

    Raises:
        ConfigError: the study, its data, model or storage is wrong, or it changed without ``allow_changes``.
        ValueError: ``gpus`` names no GPU (see :func:`parse_gpus`), or ``workers`` is below 1.
        TrialsFailed: the run stopped on ``max_failures_in_a_row`` failed (or 100 rejected) trials in a row.
        StorageLost: the storage's SQLite file was deleted or replaced, the study deleted, or its disk filled up.
    """
    flags = {"n_trials": n_trials, "timeout": timeout, "storage": storage}
    cfg = load(study, {**(overrides or {}), **{k: v for k, v in flags.items() if v is not None}}, env)
    devices = parse_gpus(gpus)
    n = workers
    if n is not None and n != "auto" and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"workers={workers!r}: the number of worker processes, 1 or more, or 'auto'")
    examples = _examples(cfg)  # before torch is imported: a broken data file fails in a second
    import optuna

    from hpo.study.loop import run_study
    from hpo.study.storage import load_existing
    from hpo.study.workers import check_before_run, run_workers
    from hpo.trial.workbench import prepare

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # hpo prints its own line per trial, through console
    try:
        bench = prepare(cfg, examples)
        visible = devices if gpus is not None else gpu_ids()
        per = cfg.resources.processes_per_trial
        if n is None:
            n = max(1, len(visible) // per)
        elif n == "auto":
            one = per > 1 or (cfg.resources.pack != 1 and not cfg.base_varies)  # a pack fills its GPU: one worker
            per_gpu = measured_workers_per_gpu(cfg, visible[0]) if visible and not one else 1
            n = auto_workers(cfg, visible, bench.model_path, per_gpu)
        check_before_run(cfg, n, visible)  # hpo.validate's check, for these workers and GPUs
        if n == 1 and gpus is None and len(visible) <= per:  # this process sees no GPU its trials do not use
            return run_study(cfg, console, bench=bench, allow_changes=allow_changes)
        code = run_workers(cfg, n, visible, console, bench=bench, allow_changes=allow_changes)
    finally:
        optuna.logging.set_verbosity(verbosity)
    study_ = load_existing(cfg)
    if code:
        raise TrialsFailed(
            "workers stopped on failed trials before the study reached n_trials (their lines above say why)", study_
        )
    return study_


def _examples(cfg: StudyConfig):
    from hpo.data import load_examples

    return load_examples(cfg)


class Report(NamedTuple):
    trials: pd.DataFrame  # one row per trial: params, metrics, z-scores and rank within (task, metric, direction)
    studies: pd.DataFrame  # one row per study: best, median, count/mean/std/min/max, steps spent and saved


def report(
    studies: Sequence[Study],
    *,
    include_pruned: bool = False,
    csv: Path | None = None,
    html: Path | None = None,
    env: str | None = None,
    storage: str | None = None,
) -> Report:
    """Compare the trials of ``studies`` on Z-scores within each task, metric and direction.

    ``include_pruned`` ranks pruned trials on their last intermediate value. With ``csv`` (the trials;
    ``<stem>.studies.csv`` beside it) or ``html``, writes those files and puts the study table in each
    study's dashboard note (where the storage may be written). A file in a study's output folder is written
    only where hpo may write (:func:`hpo.trial.folders.claim_paths`).

    Raises:
        ConfigError: a study that does not exist yet, one named twice (its trials would count twice), or an
            output folder that is not hpo's to write in (checked before anything is written).
    """
    from hpo.results import tables as rep
    from hpo.results.html import write_html
    from hpo.study.artifacts import save_study_note
    from hpo.study.storage import load_existing, resolved_config
    from hpo.trial.folders import claim_paths, path_problems

    if isinstance(studies, str | Path | Mapping | StudyConfig):  # one study, not a list of them
        studies = [studies]
    cfgs = [load(s, {"storage": storage} if storage else None, env) for s in studies]
    named = [(cfg.study, cfg.storage_label) for cfg in cfgs]
    for cfg, key in zip(cfgs, named, strict=True):
        if named.count(key) > 1:
            raise ConfigError([Problem(str(cfg.file), None, "", "the same study is named twice")])
    loaded = [load_existing(cfg) for cfg in cfgs]
    trials = rep.trials_frame(loaded, include_pruned=include_pruned)
    summary = rep.studies_frame(loaded, trials)
    paths = [*([Path(csv), rep.studies_csv(Path(csv))] if csv is not None else []), *([Path(html)] if html else [])]
    if problems := [p for cfg in cfgs for p in path_problems(cfg, *paths)]:  # before any folder is made
        raise ConfigError(problems)
    for cfg in cfgs:
        claim_paths(cfg, *paths)
    if csv is not None:
        rep.write_csv(trials, summary, Path(csv))
    if html is not None:
        write_html(loaded, trials, summary, Path(html))
    if csv is not None or html is not None:
        import sqlalchemy
        from optuna.exceptions import StorageInternalError

        for cfg, study_ in zip(cfgs, loaded, strict=True):
            # A storage this user may only read (a reporting role, an archived copy): the files are the report.
            with contextlib.suppress(StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
                save_study_note(study_, resolved_config(cfg), rep.markdown_table(summary, rep.SUMMARY_COLUMNS))
    return Report(trials, summary)


def best(
    study: Study,
    *,
    out: Path | None = None,
    env: str | None = None,
    storage: str | None = None,
    trial: int | None = None,
    pick: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best trial's configuration: (TrainingArguments kwargs, the rest: model, LoRA, knobs, data, trial).

    ``trial``: another complete trial's instead; ``pick``: the trial a condition chooses from the Pareto front
    (:func:`hpo.results.export.picked`). With ``out``, also writes them as ``out`` and ``<stem>.model.json`` (in the
    output folder, only where hpo may write: :func:`hpo.trial.folders.claim_paths`).

    Raises:
        NoCompleteTrial: the study has no complete trial, ``trial`` is not a complete one, or none meets ``pick``.
        ValueError: ``pick`` is not a condition, or names what no trial has.
        ConfigError: no such study, the study file's settings differ from those the best trial ran under, or
            ``out`` is in an output folder that is not hpo's to write in.
    """
    from hpo.results.export import best_config, model_json, write_config
    from hpo.study.storage import load_existing
    from hpo.trial.folders import claim_paths

    cfg = load(study, {"storage": storage} if storage else None, env)
    args, rest = best_config(cfg, load_existing(cfg), trial, pick)
    if out is not None:
        claim_paths(cfg, Path(out), model_json(Path(out)))
        write_config(args, rest, Path(out))
    return args, rest


def train(study: Study, *, all_data: bool = False, env: str | None = None, storage: str | None = None) -> Path:
    """Retrain the best configuration (on train + eval with ``all_data``); returns ``<outputs>/final_model``.

    Raises:
        NoCompleteTrial: the study has no complete trial.
        ConfigError: no such study, the study file changed since the best trial ran, or its trials span machines
            and no launcher reaches them.
    """
    from hpo.results.export import train_best
    from hpo.study.devices import check_launcher
    from hpo.study.storage import load_existing

    cfg = load(study, {"storage": storage} if storage else None, env)
    check_launcher(cfg)  # a trial across machines retrains across them
    return train_best(cfg, load_existing(cfg), all_data)


def submit(
    study: str | Path,
    to: Literal["slurm", "kubernetes"],
    *,
    workers: int = 1,
    gpus_per_worker: int = 0,
    sbatch: Mapping[str, Any] | None = None,
    setup: str | None = None,
    image: str | None = None,
    apply: bool = False,
    dry_run: bool = False,
    overrides: Mapping[str, Any] | None = None,
    env: str | None = None,
    storage: str | None = None,
):
    """Run the study's ``workers`` on a cluster, each an ``hpo run`` of the study file on its PostgreSQL storage.

    ``to="slurm"``: one job array (a generated sbatch script; ``sbatch`` options by their long name, over the
    study file's ``resources.slurm``); preempted or timed-out workers checkpoint their trial and requeue.
    ``to="kubernetes"``: an Indexed Job built with the ``kubernetes`` client, created with ``apply`` (else only
    returned); the storage URL comes from a Secret. ``dry_run`` checks and returns the script or Job, submitting
    and creating nothing. The study is created before its workers start, and the job recorded on it.

    Returns a :class:`hpo.clusters.Submission`: ``.text`` (the script or the Job's YAML), ``.job_id``.

    Raises:
        ConfigError: the study, its data, model or storage (SQLite is refused), or the scheduler's checks
            (``sbatch`` missing, an unknown partition, no kube-config for ``apply``), each in one line.
        TypeError: ``study`` is not a file (each worker reads it).
        ValueError: ``to`` or ``workers`` is not one hpo knows, or an ``sbatch`` option the study file would refuse.
    """
    if not isinstance(study, str | Path):
        raise TypeError(f"submit takes the study file, not a {type(study).__name__}: each worker runs hpo run on it")
    if to not in ("slurm", "kubernetes"):
        raise ValueError(f"to={to!r}: 'slurm' or 'kubernetes'")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: the number of workers, 1 or more")
    from pydantic import ValidationError

    from hpo import clusters
    from hpo.config.clusters import SlurmSettings

    try:  # the keyword's options pass the study file's checks: no option hpo sets, one line each
        SlurmSettings(sbatch=dict(sbatch or {}))
    except ValidationError as e:
        raise ValueError(f"sbatch: {e.errors()[0]['msg']}") from None
    storage = storage or (overrides or {}).get("storage")
    cfg = load(study, {**(overrides or {}), **({"storage": storage} if storage else {})}, env)
    return clusters.submit(
        cfg,
        Path(study),
        to,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        sbatch=sbatch,
        setup=setup,
        image=image,
        apply=apply,
        dry_run=dry_run,
        env=env,
        overrides=overrides,
        storage=storage,
    )


def status(
    study: Study, *, env: str | None = None, storage: str | None = None
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The study's trials counted by state (``{"COMPLETE": 5, "RUNNING": 2, ...}``) and the cluster jobs
    :func:`submit` recorded on it, each with ``tasks``: ``{task id: Slurm state}`` of those still queued.

    Raises:
        ConfigError: no such study.
    """
    from hpo.clusters import jobs_with_states
    from hpo.study.storage import load_existing

    cfg = load(study, {"storage": storage} if storage else None, env)
    study_ = load_existing(cfg)
    counts: dict[str, int] = {}
    for trial in study_.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts, jobs_with_states(study_)
