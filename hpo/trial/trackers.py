"""Experiment trackers: ``train.report_to: [mlflow, wandb]`` gives each trial a run where people already watch.

One run per trial, grouped by study (MLflow: the experiment is the study's name; W&B: the project and the
group are), named ``trial-NNNN``, with the sampled parameters, each evaluation at the same *examples seen*
step Optuna gets, the cost figures hpo measures, and the trial's final state (``hpo.state``: COMPLETE, PRUNED
or FAIL, and ``hpo.fail_reason``). TensorBoard is hpo's own and always on (``outputs/<study>/tensorboard``).

Written here, not left to transformers' ``MLflowCallback``/``WandbCallback``: those log at optimizer steps,
the Trainer's arguments rather than the sampled parameters, and know nothing of pruning or failure. Runs go
where each tracker sends them by its own settings: ``MLFLOW_TRACKING_URI`` (else MLflow's default,
``sqlite:///mlflow.db`` in the current folder); ``WANDB_MODE`` (``offline`` writes ``./wandb`` only),
``WANDB_DIR``, ``WANDB_ENTITY``. A tracker that fails is a warning, never a failed trial: the fine-tune is
worth more than its copy in a tracker.

A tracker never holds a run up. Its calls run on a thread of its own (:class:`hpo.trial.lane.Lane`), and the
trial waits for each at most :func:`hpo.config.reporting.timeout_s` seconds (``HPO_TRACKER_TIMEOUT_S``, default
10): a call that does not answer in time drops that tracker for the rest of the run, with one warning. A signal lands in the wait, never in the
tracker's call, so Ctrl-C and SIGTERM are answered at once whatever a tracker is doing; the interrupted trial's
runs then get :data:`CLOSING_S` seconds to record their end. MLflow's own HTTP settings, where the user has not
set them, follow that timeout with one retry (its defaults: 120 s a request, 7 retries with backoff: minutes
per call against a server that is down). :class:`Tracking` probes MLflow once at the start: a store that cannot
be reached is one warning, and the study trains untracked by it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hpo.config.reporting import TIMEOUT_ENV, requested, timeout_s
from hpo.trial.lane import Lane, Unanswered

#: Cost figures logged as metrics when a trial ends (user attrs of the trial).
COSTS = (
    "train_seconds",
    "peak_memory_mb",
    "trainable_parameters",
    "eval_latency_ms",
    "samples_per_second",
    "optimizer_steps",
)
#: After Ctrl-C or SIGTERM: how long, in all, the interrupted trial's runs get to record their end (seconds).
CLOSING_S = 5.0
#: MLflow's run status per way a trial ends: a pruned trial is not a failed one.
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "interrupted": "KILLED"}


def tracking_uri() -> str:
    """Where MLflow runs go: ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    import mlflow

    return mlflow.get_tracking_uri()


def shown(uri: str) -> str:
    """``uri`` with its password, if any, replaced by ``***``: printed lines never hold one."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        user = parts.username or ""
        netloc = f"{user}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    except ValueError:  # not a URL (a port that is not a number): print nothing of it that could be a secret
        return "<MLFLOW_TRACKING_URI>"


@contextlib.contextmanager
def bounded(timeout: float) -> Iterator[None]:
    """MLflow's HTTP settings that the user has not set follow ``timeout``, with one retry, while the block runs."""
    defaults = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),  # an int to MLflow
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # a refused connection fails at once, twice
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k, v in added.items():
            if os.environ.get(k) == v:
                del os.environ[k]


class Tracking:
    """The trackers one run logs to, from ``train.report_to``: enter it around the run (it probes MLflow and
    bounds MLflow's HTTP settings), then :meth:`start` a run per trial. A tracker that cannot be reached at the
    start, or that leaves a call unanswered, is dropped for the rest of the run with one warning.

    The timeout bounds trackers that talk to a server (MLflow over HTTP or to a database server, W&B online).
    A local store is bounded by its disk, not by a timeout: MLflow creates a new SQLite store's tables in ~20 s
    on a busy 2-core machine. Either way a signal is answered at once (:class:`hpo.trial.lane.Lane`)."""

    def __init__(self, cfg):
        self.study, self.names, self.timeout = cfg.study, requested(cfg.train.get("report_to")), timeout_s()
        self.limits: dict[str, float | None] = {}  # seconds a call may take, per tracker; None: a local store
        self.lanes: dict[str, Lane] = {}
        self.dropped: set[str] = set()
        self.started: set[str] = set()  # trackers that started a trial's run in this run
        self._env = contextlib.ExitStack()

    def __enter__(self) -> Tracking:
        if "mlflow" in self.names:
            self._env.enter_context(bounded(self.timeout))
        try:
            for name in self.names:
                importlib.import_module(name)  # here, not on the lane: importing mlflow sets its loggers' levels
                self.limits[name] = self.timeout if _remote(name) else None
            if "mlflow" in self.names:
                try:
                    self.call("mlflow", _probe_mlflow, deadline=self.deadline("mlflow"))
                except Exception as e:  # noqa: BLE001 - down, refused, a file store MLflow 3 refuses
                    self.drop("mlflow", f"{shown(tracking_uri())} cannot be used ({_reason(e)})", "the study")
        except BaseException:
            self._env.close()
            raise
        return self

    def __exit__(self, *_) -> None:
        for lane in self.lanes.values():
            lane.close()
        self.lanes.clear()
        self._env.close()

    def deadline(self, name: str) -> float | None:
        """When a call of tracker ``name`` made now must have answered (``time.monotonic()``); None: no limit."""
        limit = self.limits.get(name)
        return None if limit is None else time.monotonic() + limit

    def call(self, name: str, fn: Callable, *args, deadline: float | None) -> Any:
        """``fn(*args)`` on tracker ``name``'s lane (see :class:`hpo.trial.lane.Lane`); a lane left waiting is not reused."""
        if name not in self.lanes:
            self.lanes[name] = Lane(name)
        try:
            return self.lanes[name].call(fn, *args, deadline=deadline)
        except Unanswered:
            self.lanes.pop(name, None)
            raise

    def unanswered(self, name: str) -> str:
        return f"no answer within {self.limits.get(name) or self.timeout:g} s ({TIMEOUT_ENV})"

    def drop(self, name: str, why: str, what: str) -> None:
        """Tracker ``name`` is used no more in this run: one warning saying why, and what trains untracked."""
        if name not in self.dropped:
            self.dropped.add(name)
            warnings.warn(f"{name}: {why}: {what} trains untracked by {name}", stacklevel=3)

    def start(self, number: int, params: Mapping[str, Any]) -> TrialRun | None:
        """Trial ``number``'s runs in the trackers still in use; None when there are none."""
        trial = TrialRun(self, [], number)
        for name in self.names:
            if name in self.dropped:
                continue
            try:
                trial.runs.append(
                    self.call(name, BACKENDS[name], self.study, number, dict(params), deadline=self.deadline(name))
                )
                self.started.add(name)
            except Unanswered:
                self.drop(name, self.unanswered(name), f"trial {number} on")
            except Exception as e:  # noqa: BLE001 - a server down, a locked database: the trial trains untracked
                if name in self.started:
                    _warn(name, e, number)
                else:  # never reached in this run (W&B's server, a login refused): not asked again, each trial
                    self.drop(name, f"cannot start a run ({_reason(e)})", f"trial {number} on")
        return trial if trial.runs else None


class TrialRun:
    """A trial's runs: :meth:`evaluated` as evaluations come, :meth:`end` once. A tracker that raises is dropped
    for the trial; one that does not answer in time, for the run."""

    def __init__(self, tracking: Tracking, runs: list, number: int):
        self.tracking, self.runs, self.number = tracking, runs, number

    def evaluated(self, metric: str, step: int, value: float) -> None:
        """One evaluation's objective, as it happens."""
        self._each("evaluated", (metric, step, value))

    def end(self, state: str, history: list[dict[str, float]], attrs: Mapping[str, Any], reason: str | None) -> None:
        """Every evaluation, the cost figures and the final state (``interrupted``: FAIL after a signal); closes.
        After a signal, the runs get :data:`CLOSING_S` seconds in all, whatever their store: the person asked to
        stop, and a run left open in a tracker costs less than a Ctrl-C that does not answer."""
        last = int(history[-1]["step"]) if history else 0
        costs = {k: attrs[k] for k in COSTS if isinstance(attrs.get(k), int | float)}
        closing = time.monotonic() + CLOSING_S if state == "interrupted" else None
        self._each("end", ("FAIL" if state == "interrupted" else state, history, costs, last, reason, state), closing)

    def _each(self, method: str, args: tuple, closing: float | None = None) -> None:
        for run in list(self.runs):
            if run.name in self.tracking.dropped:
                self.runs.remove(run)
                continue
            deadline = closing or self.tracking.deadline(run.name)
            try:
                self.tracking.call(run.name, getattr(run, method), *args, deadline=deadline)
            except Unanswered:
                self.runs.remove(run)
                if closing is None:
                    self.tracking.drop(run.name, self.tracking.unanswered(run.name), f"trial {self.number} on")
                else:  # after a signal: the run is left open in the tracker; a rerun starts a new one
                    _warn(run.name, Unanswered(f"no answer within {CLOSING_S:g} s of the signal"), self.number)
            except Exception as e:  # noqa: BLE001 - the tracker went away mid-trial: the trial goes on
                self.runs.remove(run)
                _warn(run.name, e, self.number)


def _remote(name: str) -> bool:
    """Whether tracker ``name`` talks to a server (that may never answer) rather than a local store."""
    if name == "mlflow":
        return _local_store(tracking_uri()) is None
    return os.environ.get("WANDB_MODE", "").strip().lower() not in ("offline", "dryrun", "disabled")


def _probe_mlflow() -> None:
    """One cheap read of the tracking store: it answers, or raises."""
    from mlflow import MlflowClient

    MlflowClient().search_experiments(max_results=1)


def written(cfg, tracking: Tracking | None = None) -> dict[str, str]:
    """Where this study's runs were written, per tracker, as the command that shows them: TensorBoard's folder
    when it holds runs, MLflow's store when it holds the study's experiment. A store that does not exist is not
    opened (that would create it), and MLflow is asked no more than :func:`timeout_s` seconds.
    ``tracking``: the run's, whose dropped trackers are not asked at all."""
    hints = {}
    board = Path(cfg.output_path) / "tensorboard"
    if board.is_dir() and any(board.iterdir()):
        hints["tensorboard"] = f"tensorboard --logdir {board}"
    names = requested(cfg.train.get("report_to"))
    if "mlflow" in names and not (tracking and "mlflow" in tracking.dropped) and importlib.util.find_spec("mlflow"):
        uri = tracking_uri()
        local = _local_store(uri)
        if local is None or local.exists():
            try:
                timeout = timeout_s()
                deadline = None if local else time.monotonic() + timeout  # a local store: bounded by its disk
                lane = Lane("mlflow-summary")
                with bounded(timeout):
                    found = lane.call(_has_experiment, cfg.study, deadline=deadline)
                lane.close()
            except Exception:  # noqa: BLE001 - gone since, or down: nothing to show
                found = False
            if found:
                hints["mlflow"] = f"mlflow ui --backend-store-uri {shown(uri)}" if local else shown(uri)
    return hints


def _local_store(uri: str) -> Path | None:
    """The file or folder a local MLflow store lives in; None for a server or a database server."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        return Path(uri.split(":///", 1)[1]) if ":///" in uri else None
    if parts.scheme == "file":
        return Path(parts.path)
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (C:\ on Windows)
        return Path(uri)
    return None


def _has_experiment(study: str) -> bool:
    from mlflow import MlflowClient

    return MlflowClient().get_experiment_by_name(study) is not None


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


class _MLflow:
    """A run through ``MlflowClient`` (no process-wide active run); the objective is logged as it comes."""

    name = "mlflow"

    def __init__(self, study: str, number: int, params: dict[str, Any]):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(study)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(study)
            except Exception:  # noqa: BLE001 - another worker created it first
                experiment_id = self.client.get_experiment_by_name(study).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=f"trial-{number:04d}", tags={"hpo.trial": str(number)})
        self.run_id = run.info.run_id
        self.logged: set[tuple[str, int]] = set()  # (metric, step) already logged: never twice
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def evaluated(self, metric: str, step: int, value: float) -> None:
        self._log({metric: value}, step)

    def end(self, state: str, history, costs, last: int, reason: str | None, how: str) -> None:
        for evaluation in history:
            self._log({k: v for k, v in evaluation.items() if k != "step"}, int(evaluation["step"]))
        self._log(costs, last)
        self.client.set_tag(self.run_id, "hpo.state", state)
        if reason:
            self.client.set_tag(self.run_id, "hpo.fail_reason", reason[:500])
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[how])

    def _log(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in _finite(metrics).items() if (k, step) not in self.logged]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            self.logged.update((m.key, step) for m in batch)


class _Wandb:
    """A W&B run (project and group: the study). W&B wants steps in order, so the whole curve is logged when
    the trial ends, each evaluation with all its metrics at its examples-seen step."""

    name = "wandb"

    def __init__(self, study: str, number: int, params: dict[str, Any]):
        import wandb

        # W&B's own wait for its server (90 s by default) follows hpo's, unless the user set it.
        timeout = {"init_timeout": timeout_s()} if _remote("wandb") and not os.environ.get("WANDB_INIT_TIMEOUT") else {}
        self.run = wandb.init(
            project=study,
            group=study,
            name=f"trial-{number:04d}",
            config=params,
            reinit="create_new",  # one run per trial in a process that runs many
            settings=wandb.Settings(silent=True, console="off", **timeout),
        )

    def evaluated(self, metric: str, step: int, value: float) -> None:
        pass  # logged with the others at the end: a step W&B has passed cannot be logged again

    def end(self, state: str, history, costs, last: int, reason: str | None, how: str) -> None:
        for evaluation in history:
            self.run.log(_finite({k: v for k, v in evaluation.items() if k != "step"}), step=int(evaluation["step"]))
        self.run.summary.update(
            {**_finite(costs), "hpo.state": state, **({"hpo.fail_reason": reason} if reason else {})}
        )
        self.run.finish(exit_code=0 if state != "FAIL" else 1)


BACKENDS = {"mlflow": _MLflow, "wandb": _Wandb}


#: ``user:password@`` in a URL: a tracker's error quotes the URL it asked, password included.
_PASSWORD = re.compile(r"(//[^/@\s:]*:)[^@\s/]*@")


def _reason(e: BaseException) -> str:
    text = _PASSWORD.sub(r"\1***@", str(e).strip())
    return text.splitlines()[0][:300] if text else type(e).__name__


def _warn(name: str, e: Exception, number: int) -> None:
    warnings.warn(f"{name}: trial {number} is not tracked: {_reason(e)}", stacklevel=3)
