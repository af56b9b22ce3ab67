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
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

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


def start(cfg, number: int, params: Mapping[str, Any]) -> TrialRun | None:
    """Trial ``number``'s runs in the trackers the study asks for; None when it asks for none."""
    runs = []
    for name in requested(cfg.train.get("report_to")):
        try:
            importlib.import_module(name)  # before _quiet: importing mlflow sets its loggers' levels
            with _quiet():
                runs.append(BACKENDS[name](cfg.study, number, dict(params)))
        except Exception as e:  # noqa: BLE001 - a server down, a locked database: the trial trains untracked
            _warn(name, e, number)
    return TrialRun(runs, number) if runs else None


class TrialRun:
    """A trial's runs: :meth:`evaluated` as evaluations come, :meth:`end` once. A tracker that raises is dropped."""

    def __init__(self, runs: list, number: int):
        self.runs, self.number = runs, number

    def evaluated(self, metric: str, step: int, value: float) -> None:
        """One evaluation's objective, as it happens."""
        self._each("evaluated", metric, step, value)

    def end(self, state: str, history: list[dict[str, float]], attrs: Mapping[str, Any], reason: str | None) -> None:
        """Every evaluation, the cost figures and the final state (``interrupted``: FAIL after a signal); closes."""
        last = int(history[-1]["step"]) if history else 0
        costs = {k: attrs[k] for k in COSTS if isinstance(attrs.get(k), int | float)}
        self._each("end", "FAIL" if state == "interrupted" else state, history, costs, last, reason, state)

    def _each(self, method: str, *args) -> None:
        for run in list(self.runs):
            try:
                with _quiet():
                    getattr(run, method)(*args)
            except Exception as e:  # noqa: BLE001 - the tracker went away mid-trial: the trial goes on
                self.runs.remove(run)
                _warn(run.name, e, self.number)


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

        self.run = wandb.init(
            project=study,
            group=study,
            name=f"trial-{number:04d}",
            config=params,
            reinit="create_new",  # one run per trial in a process that runs many
            settings=wandb.Settings(silent=True, console="off"),
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


def _warn(name: str, e: Exception, number: int) -> None:
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    warnings.warn(f"{name}: trial {number} is not tracked: {reason}", stacklevel=3)
