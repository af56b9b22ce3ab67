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

A tracker never holds a run up. Its calls run on a thread of its own (:class:`_Lane`), and the trial waits for
each at most :func:`timeout_s` seconds (``HPO_TRACKER_TIMEOUT_S``, default 10): a call that does not answer in
time drops that tracker for the rest of the run, with one warning. A signal lands in the wait, never in the
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
import logging
import math
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hpo.trial import interrupts

#: Names ``train.report_to`` takes; tensorboard is always on.
SUPPORTED = ("mlflow", "wandb", "tensorboard", "none")
#: The extra that installs each tracker.
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}
#: Cost figures logged as metrics when a trial ends (user attrs of the trial).
COSTS = (
    "train_seconds",
    "peak_memory_mb",
    "trainable_parameters",
    "eval_latency_ms",
    "samples_per_second",
    "optimizer_steps",
)


#: The variable that sets how long one tracker call may take, in seconds; :data:`TIMEOUT_S` when unset.
TIMEOUT_ENV = "HPO_TRACKER_TIMEOUT_S"
TIMEOUT_S = 10.0
#: The longest timeout taken: a day. Past ~2.9e11 years a wait overflows the platform's time_t, and the tracker was
#: dropped as unreachable ("timestamp out of range") however well its server answered.
MAX_TIMEOUT_S = 86400.0
#: After Ctrl-C or SIGTERM: how long, in all, the interrupted trial's runs get to record their end (seconds).
CLOSING_S = 5.0


class Unanswered(Exception):
    """A tracker call did not return within its time."""


#: MLflow's run status per way a trial ends: a pruned trial is not a failed one.
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "interrupted": "KILLED"}


def requested(report_to: Any) -> list[str]:
    """The trackers ``train.report_to`` names, beyond TensorBoard: ``"mlflow"`` or ``["mlflow", "wandb"]``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n not in ("tensorboard", "none")]


def tracking_uri() -> str:
    """Where MLflow runs go: ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    import mlflow

    return mlflow.get_tracking_uri()


def timeout_s() -> float:
    """How long one tracker call may take: ``HPO_TRACKER_TIMEOUT_S`` seconds, else :data:`TIMEOUT_S`.

    Raises:
        ValueError: the variable is set to something other than a number of seconds in (0, MAX_TIMEOUT_S].
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise ValueError(f"{TIMEOUT_ENV}={text[:40]!r} is not a number of seconds over 0, at most {MAX_TIMEOUT_S:g}")
    return value


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


class _Lane:
    """A daemon thread that makes one tracker's calls in order; :meth:`call` waits for one until a deadline.

    The wait, not the call, is on the caller's thread: a signal that comes during it stops the run at once
    (:func:`hpo.trial.interrupts.wait`), and a call that hangs (a server that accepts and never answers) holds
    only this thread, which dies with the process."""

    def __init__(self, name: str):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=f"hpo-{name}", daemon=True).start()

    def _serve(self) -> None:
        while (item := self.calls.get()) is not None:
            fn, args, box, done = item
            try:
                with _quiet():
                    box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who decides
                box.append((False, e))
            done.set()

    def close(self) -> None:
        """The thread ends once its calls are done (at once, if it is idle)."""
        self.calls.put(None)

    def call(self, fn: Callable, *args, deadline: float | None) -> Any:
        """``fn(*args)`` on this lane; raises what it raised, or :class:`Unanswered` past ``deadline`` (None: none)."""
        box: list = []
        done = threading.Event()
        self.calls.put((fn, args, box, done))
        # A safe point: a signal that comes during the wait stops the run now, while the call goes on in its thread.
        if not interrupts.wait(done, None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise Unanswered("no answer within the tracker timeout")
        ok, value = box[0]
        if not ok:
            raise value
        return value


class Tracking:
    """The trackers one run logs to, from ``train.report_to``: enter it around the run (it probes MLflow and
    bounds MLflow's HTTP settings), then :meth:`start` a run per trial. A tracker that cannot be reached at the
    start, or that leaves a call unanswered, is dropped for the rest of the run with one warning.

    The timeout bounds trackers that talk to a server (MLflow over HTTP or to a database server, W&B online).
    A local store is bounded by its disk, not by a timeout: MLflow creates a new SQLite store's tables in ~20 s
    on a busy 2-core machine. Either way a signal is answered at once (:class:`_Lane`)."""

    def __init__(self, cfg):
        self.study, self.names, self.timeout = cfg.study, requested(cfg.train.get("report_to")), timeout_s()
        self.limits: dict[str, float | None] = {}  # seconds a call may take, per tracker; None: a local store
        self.lanes: dict[str, _Lane] = {}
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
        """``fn(*args)`` on tracker ``name``'s lane (see :class:`_Lane`); a lane left waiting is not reused."""
        if name not in self.lanes:
            self.lanes[name] = _Lane(name)
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
                lane = _Lane("mlflow-summary")
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
        run = self.client.create_run(
            experiment_id, run_name=f"trial-{number:04d}", tags={"hpo.trial.finetune": str(number)}
        )
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


@contextlib.contextmanager
def _quiet():
    """MLflow's INFO lines (it creates its database tables on first use) off; hpo prints its own."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


#: ``user:password@`` in a URL: a tracker's error quotes the URL it asked, password included.
_PASSWORD = re.compile(r"(//[^/@\s:]*:)[^@\s/]*@")


def _reason(e: BaseException) -> str:
    text = _PASSWORD.sub(r"\1***@", str(e).strip())
    return text.splitlines()[0][:300] if text else type(e).__name__


def _warn(name: str, e: Exception, number: int) -> None:
    warnings.warn(f"{name}: trial {number} is not tracked: {_reason(e)}", stacklevel=3)
