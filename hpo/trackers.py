"""Experiment trackers: ``train.report_to: [mlflow]`` gives each trial a run in the tracker people already watch.

One run per trial, grouped by study (MLflow: the experiment is the study's name), named ``trial-NNNN``, with
the sampled parameters, each evaluation at the same *examples seen* step Optuna gets (the objective as it
happens, the task's other metrics when the trial ends), the cost figures hpo measures, and the trial's final
state (tag ``hpo.state``: COMPLETE, PRUNED or FAIL, and ``hpo.fail_reason``). TensorBoard is hpo's own and
always on (``outputs/<study>/tensorboard``).

Written here, not left to transformers' ``MLflowCallback``: that logs at optimizer steps, the Trainer's
arguments rather than the sampled parameters, and knows nothing of pruning or failure. The runs go through
``MlflowClient`` (no process-wide active run), to MLflow's own tracking URI (``MLFLOW_TRACKING_URI``, else its
default ``sqlite:///mlflow.db`` in the current folder).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

#: Names ``train.report_to`` takes; tensorboard is always on.
SUPPORTED = ("mlflow", "tensorboard", "none")
#: The extra that installs each tracker.
EXTRAS = {"mlflow": "mlflow"}
#: Cost figures logged as metrics when a trial ends (user attrs of the trial).
COSTS = ("train_seconds", "peak_memory_mb", "trainable_parameters", "samples_per_second", "optimizer_steps")
#: MLflow run status per way a trial ends (a pruned trial is not a failed one).
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "interrupted": "KILLED"}


def requested(report_to: Any) -> list[str]:
    """The trackers ``train.report_to`` names, beyond TensorBoard: ``"mlflow"`` or ``["mlflow", ...]``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n not in ("tensorboard", "none")]


def tracking_uri() -> str:
    """Where MLflow runs go: ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    import mlflow

    return mlflow.get_tracking_uri()


def start(cfg, number: int, params: Mapping[str, Any]) -> TrialRun | None:
    """Trial ``number``'s run, when the study asks for a tracker. A tracker that cannot be reached is a warning,
    never a failed trial: the fine-tune is worth more than its copy in a tracker."""
    if "mlflow" not in requested(cfg.train.get("report_to")):
        return None
    try:
        with _quiet():
            return TrialRun(cfg.study, number, params)
    except Exception as e:  # noqa: BLE001 - a server down, a locked database: the trial trains untracked
        _warn(e, number)
        return None


@contextlib.contextmanager
def _quiet():
    """MLflow's INFO lines (it creates its database tables on first use) off; hpo prints its own."""
    import mlflow  # noqa: F401 - first: importing it sets its loggers' levels

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _warn(e: Exception, number: int) -> None:
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    warnings.warn(f"mlflow: trial {number} is not tracked: {reason}", stacklevel=3)


class TrialRun:
    """A trial's run in each requested tracker: :meth:`evaluated` as evaluations come, :meth:`end` once."""

    def __init__(self, study: str, number: int, params: Mapping[str, Any]):
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
        self.run_id, self.number, self.broken = run.info.run_id, number, False
        self.logged: set[tuple[str, int]] = set()  # (metric, step) already logged: never twice
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def evaluated(self, metric: str, step: int, value: float) -> None:
        """Log one evaluation's objective as it happens."""
        self._log({metric: value}, step)

    def end(self, state: str, history: list[dict[str, float]], attrs: Mapping[str, Any], reason: str | None) -> None:
        """Log what the trial measured (every evaluation, its cost figures) and its final state, then close."""
        for evaluation in history:
            self._log({k: v for k, v in evaluation.items() if k != "step"}, int(evaluation["step"]))
        last = int(history[-1]["step"]) if history else 0
        self._log({k: attrs[k] for k in COSTS if isinstance(attrs.get(k), int | float)}, last)
        tags = {"hpo.state": "FAIL" if state == "interrupted" else state}
        if reason:
            tags["hpo.fail_reason"] = reason[:500]
        if self.broken:
            return
        try:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            self.client.set_terminated(self.run_id, STATUS[state])
        except Exception as e:  # noqa: BLE001 - as in _log
            _warn(e, self.number)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.broken:
            return
        batch = [
            Metric(k, float(v), int(time.time() * 1000), step)
            for k, v in metrics.items()
            if (k, step) not in self.logged and isinstance(v, int | float) and math.isfinite(v)
        ]
        if batch:
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - the tracker went away mid-trial: the trial goes on
                self.broken = True
                _warn(e, self.number)
            self.logged.update((m.key, step) for m in batch)
