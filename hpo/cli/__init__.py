"""The ``hpo`` command: parse arguments, call the library, print."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from hpo import api
from hpo.config import load_study, parse_yaml
from hpo.errors import ConfigError, NoCompleteTrial, StorageLost, TrialsFailed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Hyperparameter optimization for fine-tuning transformer models.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StudyFile = Annotated[Path, typer.Argument(help="The study file (YAML).", show_default=False)]
Env = Annotated[str | None, typer.Option("--env", help="An environment from the file's environments: mapping.")]
Storage = Annotated[
    str | None,
    typer.Option(
        envvar="HPO_STORAGE",
        show_envvar=False,
        help="Storage URL, when not the study file's (e.g. the one given to hpo run --storage); default $HPO_STORAGE.",
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="key.path=value pairs that win over the file, e.g. n_trials=3 train.num_train_epochs=1.",
        show_default=False,
    ),
]


def _parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            err.print(f"[red]error[/] <command line>: {escape(repr(pair))}: an override is key.path=value")
            raise typer.Exit(2)
        try:  # YAML typing: 3 → int, 1.0e-4 → float, [a, b] → list; checked like a study file (alias bombs)
            out[key] = parse_yaml(value, "<command line>")[0] if value else None
        except ConfigError as e:
            if not e.problems[0].message.startswith("YAML syntax error"):
                _fail(e)
            out[key] = value  # not YAML: the text as it is
    return out


def _storage(url: str | None) -> dict[str, Any]:
    """``--storage``; a relative SQLite path in it is relative to the folder the command runs in."""
    from hpo.config import absolute_sqlite

    return {} if url is None else {"storage": absolute_sqlite(url, Path.cwd())}


def _load(path: Path, overrides: dict[str, Any], env: str | None = None):
    try:
        return load_study(path, overrides, env)
    except ConfigError as e:
        _fail(e)


def _fail(e: ConfigError):
    for problem in e.problems:
        err.print(f"[red]error[/] {escape(str(problem))}")
    raise typer.Exit(2)


@app.command()
def run(
    study: StudyFile,
    overrides: Overrides = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", min=1, help="Finished trials the study should hold.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            envvar="HPO_STORAGE",
            show_envvar=False,
            help="Storage URL (default: $HPO_STORAGE, else the study file's, else sqlite beside it); the same URL "
            "on many machines joins one study.",
        ),
    ] = None,
    env: Env = None,
    workers: Annotated[
        str | None,
        typer.Option(
            help="Worker processes on this machine: N, or auto (per GPU as many as hpo check's measured peak "
            "fits, else one per CPU core as memory allows; at most n_trials/4). Default: one per GPU (--gpus, else "
            "every visible one), else 1."
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPUs for the workers, e.g. 0,1,2,3: one per worker, round robin (default: every visible GPU)."
        ),
    ] = None,
    allow_changes: Annotated[
        bool,
        typer.Option(
            "--allow-changes",
            help="Accept a study file that changed what "
            "the study's trials mean (search space, data, train: …) and record "
            "it as a new revision; the objective cannot change.",
        ),
    ] = False,
) -> None:
    """Create or resume the study and run trials until it holds n_trials finished ones."""
    flags = {"n_trials": n_trials, "timeout": timeout, **_storage(storage)}
    cfg = _load(study, {**_parse_overrides(overrides), **{k: v for k, v in flags.items() if v is not None}}, env)
    import optuna
    import sqlalchemy

    code = 0
    try:
        api.run(cfg, workers=_workers(workers, gpus), gpus=gpus, allow_changes=allow_changes)
    except ConfigError as e:
        _fail(e)
    except TrialsFailed:
        code = 1  # the red "stopping:" line said why
    except StorageLost as e:
        err.print(f"[red]error[/] {escape(cfg.masked(str(e)))}")
        code = 1
    except KeyboardInterrupt:
        again = "the job resumes it when it starts again" if os.environ.get("HPO_JOB") else "run the same command again"
        err.print(f"interrupted: finished trials are kept, the running one is queued again; {again} to resume")
        raise typer.Exit(130) from None
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        reason = cfg.masked(str(getattr(e, "orig", None) or e.__cause__ or e).strip().splitlines()[0][:200])
        err.print(
            f"[red]error[/] lost the storage {escape(cfg.storage_label)}: {escape(reason)}; finished "
            "trials are kept: run the same command again to resume"
        )
        code = 1
    raise typer.Exit(code)


def _workers(workers: str | None, gpus: str | None) -> int | str | None:
    """``--workers`` as ``hpo.run`` takes it, after ``--gpus`` is checked; a wrong one is one line, exit 2."""
    try:
        api.parse_gpus(gpus)
    except ValueError as e:
        err.print(f"[red]error[/] <command line>: --gpus: {escape(str(e))}")
        raise typer.Exit(2) from None
    if workers is None or workers == "auto":
        return workers
    if not (workers.isascii() and workers.isdigit()) or int(workers) < 1:
        err.print(
            f"[red]error[/] <command line>: --workers: {escape(workers)!r} is not a number of processes (1, 2, …) or auto"
        )
        raise typer.Exit(2)
    return int(workers)


@app.command()
def validate(study: StudyFile, overrides: Overrides = None, env: Env = None) -> None:
    """Check a study file without training; print every problem, exit 2 if any."""
    cfg = _load(study, _parse_overrides(overrides), env)
    try:
        api.validate(cfg)
    except ConfigError as e:
        _fail(e)
    Console().print(f"{study}: ok ({len(cfg.search_space)} parameters, {cfg.n_trials} trials)")


@app.command()
def check(
    study: StudyFile,
    overrides: Overrides = None,
    env: Env = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Measure a few real steps at the hungriest and cheapest corners of the space: memory and time; exit 1 if a
    corner does not fit."""
    cfg = _load(study, _parse_overrides(overrides), env)
    from hpo.trial.preflight import CheckFailed  # torch: after the file is checked

    try:
        report = api.check(cfg)
    except ConfigError as e:
        _fail(e)
    except CheckFailed as e:
        err.print(f"[red]error[/] {escape(cfg.masked(str(e)))}")
        raise typer.Exit(1) from None
    if as_json:
        import json

        print(json.dumps(report.as_json(), indent=2, default=str))
    else:
        from hpo.results.check import print_report

        print_report(Console(highlight=False), report)
    raise typer.Exit(0 if report.fits else 1)


@app.command()
def report(
    studies: Annotated[list[Path], typer.Argument(help="One or more study files to compare.", show_default=False)],
    csv: Annotated[
        Path | None, typer.Option(help="Trials CSV (the per-study table goes to <stem>.studies.csv).")
    ] = None,
    html: Annotated[Path | None, typer.Option(help="The HTML report.")] = None,
    env: Env = None,
    storage: Storage = None,
    include_pruned: Annotated[
        bool,
        typer.Option(
            "--include-pruned",
            help="Rank pruned trials too, on their last intermediate value (final = False in the tables).",
        ),
    ] = False,
) -> None:
    """Compare trials and studies on Z-scores within each task, metric and direction; write CSV and HTML."""
    from hpo.results.tables import studies_csv
    from hpo.results.terminal import print_tables

    cfgs = [_load(path, _storage(storage), env) for path in studies]
    folder = cfgs[0].output_path / "report"
    csv, html = csv or folder / "trials.csv", html or folder / "report.html"
    try:
        trials, summary = api.report(cfgs, include_pruned=include_pruned, csv=csv, html=html)
    except ConfigError as e:
        _fail(e)
    except OSError as e:
        err.print(f"[red]error[/] cannot write {escape(str(e.filename or folder))}: {escape(e.strerror or str(e))}")
        raise typer.Exit(2) from None
    console = Console()
    print_tables(console, trials, summary, include_pruned)
    for path in (csv, studies_csv(csv), html):
        console.print(f"wrote {path}")


@app.command()
def best(
    study: StudyFile,
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON for TrainingArguments(**json.load(f)).")] = None,
    env: Env = None,
    storage: Storage = None,
    trial: Annotated[
        int | None, typer.Option("--trial", min=0, help="Another complete trial's configuration (default: the best).")
    ] = None,
    pick: Annotated[
        str | None,
        typer.Option(
            "--pick",
            help='The trial a condition chooses from the Pareto front, e.g. "peak_memory_mb <= 24000": among '
            "those that meet it, the best on the first objective.",
        ),
    ] = None,
) -> None:
    """Write the best configuration: TrainingArguments JSON, and <stem>.model.json beside it."""
    from hpo.results.export import model_json

    cfg = _load(study, {**_parse_overrides(overrides), **_storage(storage)}, env)
    if trial is not None and pick is not None:
        err.print("[red]error[/] <command line>: --trial and --pick: give one")
        raise typer.Exit(2)
    default = (
        "best.json"
        if trial is None and pick is None
        else f"trial-{trial:04d}.json"
        if trial is not None
        else "picked.json"
    )
    out = out or cfg.output_path / default  # never over best.json: that is the best trial's
    try:
        _, rest = api.best(cfg, out=out, trial=trial, pick=pick)
    except ConfigError as e:
        _fail(e)
    except (NoCompleteTrial, ValueError) as e:
        err.print(f"[red]error[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except OSError as e:
        err.print(f"[red]error[/] cannot write {escape(str(out))}: {escape(e.strerror or str(e))}")
        raise typer.Exit(2) from None
    console = Console()
    revision = (
        f" (revision {rest['revision']} of {rest['current_revision']}: see the report's revision column)"
        if rest["current_revision"]
        else ""
    )
    which = "trial" if trial is not None else "picked" if pick is not None else "best"
    console.print(f"{which}: trial {rest['trial']}, {rest['metric']}={rest['value']:.4f}{revision}")
    if test := {k: v for k, v in rest.get("test", {}).items() if isinstance(v, int | float)}:  # held out
        console.print("on data.test: " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
    if "finalists" in rest:
        from hpo.results.terminal import print_finalists

        print_finalists(console, rest["metric"], rest["finalists"])
    for path in (out, model_json(out)):
        console.print(f"wrote {path}")


@app.command()
def train(
    study: StudyFile,
    overrides: Overrides = None,
    best: Annotated[bool, typer.Option("--best", help="Retrain the study's best configuration.")] = False,
    all_data: Annotated[bool, typer.Option("--all-data", help="Train on train + eval.")] = False,
    env: Env = None,
    storage: Storage = None,
) -> None:
    """Retrain the best configuration and save the model with a model card."""
    if not best:
        err.print("[red]error[/] hpo train needs --best (the only configuration it trains)")
        raise typer.Exit(2)
    cfg = _load(study, {**_parse_overrides(overrides), **_storage(storage)}, env)
    try:
        folder = api.train(cfg, all_data=all_data)
    except ConfigError as e:
        _fail(e)
    except NoCompleteTrial as e:
        err.print(f"[red]error[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except RuntimeError as e:
        from hpo.trial.memory import OutOfMemory  # torch: only once training ran

        if not isinstance(e, OutOfMemory):
            raise
        err.print(f"[red]error[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    Console().print(f"saved {folder}")


@app.command()
def dashboard(
    study: StudyFile,
    overrides: Overrides = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the study.")] = "127.0.0.1",
    env: Env = None,
    storage: Storage = None,
) -> None:
    """Serve optuna-dashboard on the study's storage, with the trials' artifacts."""
    from hpo.results.dashboard import exposed, serve
    from hpo.study.storage import load_existing

    cfg = _load(study, {**_parse_overrides(overrides), **_storage(storage)}, env)
    try:
        load_existing(cfg)
    except ConfigError as e:
        _fail(e)
    if exposed(host):
        err.print(
            f"[yellow]warning[/] binding {escape(host)}: optuna-dashboard has no authentication; anyone who "
            "reaches this address can read and change the study"
        )
    Console().print(f"{cfg.study} in {cfg.storage_label}\nserving http://{host}:{port}/dashboard  (Ctrl-C stops)")
    try:
        serve(cfg, host, port)
    except ConfigError as e:
        _fail(e)
    except OSError as e:  # the port is taken, or the address is not this machine's
        err.print(f"[red]error[/] cannot serve on {escape(host)}:{port}: {escape(e.strerror or str(e))}")
        raise typer.Exit(2) from None


@app.command()
def schema(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the schema files.")] = Path("schemas"),
) -> None:
    """Write JSON Schemas for study files and search-space files (for editors)."""
    from hpo.config.schema import write_schemas

    for path in write_schemas(out):
        Console().print(f"wrote {path}")


from hpo.cli import clusters as _clusters  # noqa: E402, F401 - hpo submit, hpo status: registered on app
