"""What ``train.report_to`` may name, and how long a tracker call may take: what validation checks before any
trial, and :mod:`hpo.trial.trackers` then uses. No tracker is imported here."""

from __future__ import annotations

import math
import os
from typing import Any

#: Names ``train.report_to`` takes; tensorboard is always on.
SUPPORTED = ("mlflow", "wandb", "tensorboard", "none")
#: The extra that installs each tracker.
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}

#: The variable that sets how long one tracker call may take, in seconds; :data:`TIMEOUT_S` when unset.
TIMEOUT_ENV = "HPO_TRACKER_TIMEOUT_S"
TIMEOUT_S = 10.0
#: The longest timeout taken: a day. Past ~2.9e11 years a wait overflows the platform's time_t, and the tracker was
#: dropped as unreachable ("timestamp out of range") however well its server answered.
MAX_TIMEOUT_S = 86400.0


def requested(report_to: Any) -> list[str]:
    """The trackers ``train.report_to`` names, beyond TensorBoard: ``"mlflow"`` or ``["mlflow", "wandb"]``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n not in ("tensorboard", "none")]


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
