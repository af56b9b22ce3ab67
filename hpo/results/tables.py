"""Studies → pandas tables (trials, per-study summary) with Z-scores, and CSV (the HTML report: hpo.results.html).

Only like is compared with like. Every z-score, ``score`` and ``rank`` is
computed within one *group* of rows: the same task, objective metric and
direction (``GROUP``; the ``task``, ``metric`` and ``direction`` columns).
An F1 of 0.20 is never ranked against a loss, nor a causal-lm's eval_loss
against a classifier's; ``rank`` 1 is the best row of each group.

Pruned trials are listed (``state`` "pruned", ``final`` False) but not scored
by default: their objective is the last intermediate value, not a final one.
``include_pruned=True`` scores them with the complete trials, still marked by
``final``.

Z-scores use the population standard deviation (``ddof=0``), so every ``z_``
column has mean 0 and standard deviation 1 over the scored rows of a group; a
constant column gives 0, not NaN. Each is oriented so that higher is better.
``rank`` orders by the objective within the group (1 = best; for trials of one
study, rank 1 is the trial ``hpo best`` exports; studies rank by their best
value), ties broken by ``score``: the mean of the quality z-scores (objective,
accuracy, macro F1 for trials; best and median objective for studies), a
second opinion that weighs the other metrics too. Cost metrics (steps,
seconds, memory) get z-scores too, outside the score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from hpo.attrs import CONFIG, DERIVED_PARAMS, FINALIST, PRUNED_AT_STEP, REVISION, TEST_METRICS, TEST_TOP_K
from hpo.distributions import at_edges
from hpo.study.storage import best_trial
from hpo.tasks import HIGHER_IS_BETTER

#: Task metrics that count toward ``score`` (precision and recall are in F1 already; the loss is the objective's or
#: best/last_eval_loss's).
SCORED = frozenset({"eval_accuracy", "eval_f1_macro", "eval_f1", "eval_perplexity"})
TASK_METRICS = tuple(m for m in HIGHER_IS_BETTER if m != "eval_loss")
#: Trial metrics (user attrs): name → (higher is better, counts toward ``score``).
TRIAL_METRICS: dict[str, tuple[bool, bool]] = {
    "objective": (True, True),  # oriented per study: a minimized objective is negated first
    **{m: (HIGHER_IS_BETTER[m], m in SCORED) for m in TASK_METRICS},
    "best_eval_loss": (False, False),
    "last_eval_loss": (False, False),
    "optimizer_steps": (False, False),
    "train_seconds": (False, False),
    "samples_per_second": (True, False),
    "peak_memory_mb": (False, False),
}
#: Study summary metrics, the same way.
STUDY_METRICS: dict[str, tuple[bool, bool]] = {
    "best": (True, True),  # oriented by the study's direction
    "median": (True, True),
    "steps_spent": (False, False),
}
#: Trial user attrs copied into the trials table, in this order.
ATTRS = (
    "best_eval_loss",
    "last_eval_loss",
    *TASK_METRICS,
    "optimizer_steps",
    "planned_steps",
    "examples_seen",
    "train_seconds",
    "samples_per_second",
    "peak_memory_mb",
    "eval_latency_ms",
    "trainable_parameters",
    "value_std",  # repeats: the objective is the seeds' mean, this their spread
    PRUNED_AT_STEP,
    REVISION,
)  # the revision of the study file the trial ran under
#: The columns whose values must agree for rows to be compared: z-scores, score and rank never cross a group.
#: Every z-score, not only the objective's, stays within it: ``score`` averages them, so a rank would otherwise
#: move when a study of another objective joins the report.
GROUP = ("task", "metric", "direction")
#: The objective's summary per study and metric (over complete trials), as ``DataFrameGroupBy.agg`` names them.
STATS = ("count", "mean", "std", "min", "max")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def zscore(x: pd.Series) -> pd.Series:
    """``(x - mean) / std`` with ``ddof=0``; a constant (or single-value) column gives 0 where x is known."""
    x = pd.to_numeric(x, errors="coerce").astype(float)
    if x.nunique() <= 1:  # also spares identical values the float noise of mean and std (z = ±1 from 1e-13)
        return x.where(x.isna(), 0.0)
    return (x - x.mean()) / x.std(ddof=0)


def _zscores(x: pd.Series, groups: pd.Series) -> pd.Series:
    """:func:`zscore` within each group, vectorized (10,000 trials).

    Infinite values get no z-score. The rest are divided by the group's largest magnitude first (z is
    scale-free): a diverged trial's perplexity of 1e304 would otherwise overflow the variance and zero
    every z of the group.
    """
    x = x.where(np.isfinite(x))
    scale = x.abs().groupby(groups).transform("max").replace(0.0, 1.0)
    x = x / scale
    g = x.groupby(groups)
    z = (x - g.transform("mean")) / g.transform("std", ddof=0)
    return z.where(g.transform("nunique") > 1, x.where(x.isna(), 0.0))


def add_scores(
    df: pd.DataFrame,
    metrics: dict[str, tuple[bool, bool]],
    oriented: Sequence[str] = (),
    by: Sequence[str] = GROUP,
    rows: pd.Series | None = None,
    tiebreak: str | None = None,
) -> pd.DataFrame:
    """A copy of ``df`` with ``z_<metric>``, ``score`` and ``rank`` columns, each computed within a group.

    ``oriented`` metrics flip by the row's ``direction``; the others by ``metrics``. Groups are the
    distinct values of the ``by`` columns present in ``df`` (none: one group). ``rows``, a boolean
    mask (default: all), picks the rows scored; the others get NaN z-scores, score and rank.
    ``rank`` orders each group by the raw value of the first metric of ``metrics`` (the objective;
    infinities included), ties broken by the ``tiebreak`` column (lowest first: the trial number, as
    :func:`hpo.study.storage.best_trial` breaks them) or else by ``score``: the report's rank 1 is ``hpo best``'s trial.
    """
    df = df.copy()
    keep = pd.Series(True, index=df.index) if rows is None else rows.astype(bool)
    keys = [k for k in by if k in df]
    groups = df.groupby(keys, dropna=False, sort=False).ngroup() if keys else pd.Series(0, index=df.index)
    score_columns = []
    for metric, (higher_is_better, in_score) in metrics.items():
        if metric not in df:
            continue
        values = _oriented(df, metric, higher_is_better, metric in oriented)
        df[f"z_{metric}"] = _zscores(values.where(keep), groups)
        if in_score:
            score_columns.append(f"z_{metric}")
    df["score"] = df[score_columns].mean(axis=1, skipna=True).where(keep) if score_columns else np.nan
    first = next(iter(metrics))
    value = _oriented(df, first, metrics[first][0], first in oriented) if first in df else df["score"]
    second = -df[tiebreak] if tiebreak in df else df["score"]  # higher is better, like value
    order = pd.DataFrame({"value": value.where(keep), "second": second, "group": groups}).dropna(subset=["value"])
    order = order.sort_values(["group", "value", "second"], ascending=[True, False, False], na_position="last")
    df["rank"] = (order.groupby("group").cumcount() + 1).reindex(df.index).astype("Int64")
    return df


def _oriented(df: pd.DataFrame, metric: str, higher_is_better: bool, by_direction: bool) -> pd.Series:
    values = pd.to_numeric(df[metric], errors="coerce").astype(float)
    if by_direction:
        return values.where(df["direction"] == "maximize", -values)
    return values if higher_is_better else -values


def _group(study: optuna.Study) -> dict[str, Any]:
    """The study's task, objective metric and direction (``GROUP``), from the resolved config it was saved with."""
    config = study.user_attrs.get(CONFIG, {})
    return {
        "task": config.get("task"),
        "metric": config.get("objective", {}).get("metric", "objective"),
        "direction": study.directions[0].name.lower(),  # with several objectives, the first's
    }


def trials_frame(studies: Sequence[optuna.Study], include_pruned: bool = False) -> pd.DataFrame:
    """One row per finished (complete or pruned) trial of every study, with Z-scores, score and rank per group.

    Columns: study, trial, state, final (complete: the objective is final, not a pruned trial's
    last intermediate value), task, metric, direction, objective, the measured attrs (``ATTRS``),
    ``params_<name>``, ``z_<metric>``, score, rank. Rows compare only within their group (``GROUP``).
    Pruned trials get NaN z-scores, score and rank unless ``include_pruned``; a trial without an
    objective value is never scored.

    >>> study = optuna.create_study()
    >>> study.add_trial(optuna.trial.create_trial(value=0.5))
    >>> trials_frame([study])[["trial", "final", "metric", "rank"]].to_dict("records")
    [{'trial': 0, 'final': True, 'metric': 'objective', 'rank': 1}]
    """
    rows = []
    for study in studies:
        group = _group(study)
        front = {t.number for t in study.best_trials} if len(study.directions) > 1 else None
        for t in _finished(study):
            row: dict[str, Any] = {
                "study": study.study_name,
                "trial": t.number,
                "state": t.state.name.lower(),
                "final": t.state == TrialState.COMPLETE,
                **group,
                "objective": t.values[0] if t.values else None,  # with several objectives, the first
            }
            if front is not None:  # several objectives: whether no other trial beats it on all of them
                row["pareto"] = t.number in front
            row.update({k: t.user_attrs.get(k) for k in ATTRS})
            row[REVISION] = t.user_attrs.get(REVISION, 0)  # trials from before revisions were kept: 0
            row.update({f"params_{k}": v for k, v in {**t.params, **t.user_attrs.get(DERIVED_PARAMS, {})}.items()})
            test = t.user_attrs.get(TEST_METRICS)
            row.update({k: v for k, v in (test if isinstance(test, dict) else {}).items() if k.startswith("test_")})
            row.update(_finalist(t.user_attrs.get(FINALIST)))
            rows.append(row)
    columns = ["study", "trial", "state", "final", *GROUP, "objective", *ATTRS]
    df = pd.DataFrame(rows, columns=columns + sorted({c for r in rows for c in r} - set(columns)))
    df["final"] = df["final"].astype(bool)
    scored = (df["final"] | include_pruned) & df["objective"].notna()
    df = add_scores(df, TRIAL_METRICS, oriented=("objective",), rows=scored, tiebreak="trial")
    # data.test, beside eval for each group's top trials only: a held-out score to see the optimism of choosing
    # on eval, not one more number to choose by (the trials below them were not all evaluated on it)
    for name in [c for c in df.columns if c.startswith("test_")]:
        df[name] = pd.to_numeric(df[name], errors="coerce").where(df["final"] & (df["rank"] <= TEST_TOP_K))
    if "finalist" in df:  # a study's finalists: its top N complete trials; one later pushed out of them is not
        order = df["rank"].where(df["final"]).groupby(df["study"]).rank(method="first")
        df["finalist"] = df["finalist"].where(order <= df.pop("finalists_top"))
    return df


def _finalist(found: Any) -> dict[str, Any]:
    """A finalist's generation scores as ``gen_<metric>`` columns, and the one that ranks finalists as ``finalist``."""
    found = found if isinstance(found, dict) else {}
    scores = found.get("scores", {})
    ranks = found.get("rank_by") in scores
    return {f"gen_{k}": v for k, v in scores.items()} | (
        {"finalist": scores[found["rank_by"]], "finalists_top": found.get("top")} if ranks else {}
    )


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def studies_frame(studies: Sequence[optuna.Study], trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per study, with Z-scores, score and rank within its group (``GROUP``).

    Columns: study, task, metric, direction, trial counts, best and median objective, the objective's
    ``STATS`` over complete trials (count, mean, std with ``ddof=1``, min, max), steps spent and saved
    by pruning, best trial and params, ``z_<metric>``, score, rank. ``trials``: the
    :func:`trials_frame` of ``studies`` (default: computed); its pruned rows count toward steps only,
    whether or not they were scored.
    """
    trials = trials_frame(studies) if trials is None else trials
    final = trials[trials["final"]]
    stats = final.groupby(["study", "metric"], sort=False)["objective"].agg(list(STATS))
    rows = []
    for study in studies:
        group = _group(study)
        mine = trials[trials["study"] == study.study_name]
        pruned = mine[mine["state"] == "pruned"]
        states = [t.state for t in study.get_trials(deepcopy=False)]
        try:
            best: optuna.trial.FrozenTrial | None = best_trial(study)
        except ValueError:
            best = None
        key = (study.study_name, group["metric"])
        rows.append(
            {
                "study": study.study_name,
                **group,
                "n_complete": states.count(TrialState.COMPLETE),
                "n_pruned": states.count(TrialState.PRUNED),
                "n_failed": states.count(TrialState.FAIL),
                "best": best.values[0] if best else np.nan,
                "median": final.loc[final["study"] == study.study_name, "objective"].median(),
                **(stats.loc[key].to_dict() if key in stats.index else {"count": 0} | dict.fromkeys(STATS[1:], np.nan)),
                "steps_spent": int(mine["optimizer_steps"].fillna(0).sum()),
                "steps_saved_by_pruning": int((pruned["planned_steps"] - pruned["optimizer_steps"]).fillna(0).sum()),
                "best_trial": best.number if best else None,
                "best_params": json.dumps(best.params if best else {}, sort_keys=True),
                # the best trial's parameters at the edge of their range: the optimum may lie past the bound
                "at_edge": "; ".join(at_edges(best.params, best.distributions)) if best else "",
            }
        )
    df = pd.DataFrame(rows)
    if len(df):
        df["count"] = df["count"].astype(int)
    return add_scores(df, STUDY_METRICS, oriented=("best", "median"))


def by_group(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``df``'s rows split by ``GROUP``, in order of appearance, each sorted best first (unranked last).

    Each comes with a label such as ``task=sequence-classification, metric=eval_loss, direction=minimize``.
    """
    keys = [k for k in GROUP if k in df]
    if not len(df):
        return []
    if not keys:
        return [("", df.sort_values("rank", na_position="last", kind="stable"))]
    return [
        (
            ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True) if not pd.isna(v)),
            rows.sort_values("rank", na_position="last", kind="stable"),
        )
        for key, rows in df.groupby(keys, dropna=False, sort=False)
    ]


def markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A small Markdown table (for dashboard notes); floats with 4 significant digits."""
    columns = [c for c in columns if c in df]

    def cell(v: Any) -> str:
        return "" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v)  # pd.NA: an unranked row

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[columns].itertuples(index=False)]
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    "rank",
    "study",
    "task",
    "metric",
    "direction",
    "best",
    "median",
    "mean",
    "std",
    "n_complete",
    "n_pruned",
    "n_failed",
    "steps_spent",
    "steps_saved_by_pruning",
    "score",
)


def studies_csv(path: Path) -> Path:
    """Where :func:`write_csv` puts the per-study table when the trials go to ``path``."""
    return path.with_name(f"{path.stem}.studies.csv")


def write_csv(trials: pd.DataFrame, studies: pd.DataFrame, path: Path) -> tuple[Path, Path]:
    """``path`` gets the trials table; ``<stem>.studies.csv`` beside it the per-study one; text cells and
    headers through :func:`spreadsheet_safe`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    studies_path = studies_csv(path)
    for df, to in ((trials, path), (studies, studies_path)):
        text = [c for c in df.columns if not (is_numeric_dtype(df[c]) or is_bool_dtype(df[c]))]
        df.assign(**{c: df[c].map(spreadsheet_safe) for c in text}).rename(columns=spreadsheet_safe).to_csv(
            to, index=False
        )
    return path, studies_path


#: First characters that make a spreadsheet read a cell as a formula (OWASP's CSV injection advice), with the
#: full-width forms that Excel also takes for them.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: Any) -> Any:
    """``value``, or a text that a spreadsheet would run as a formula after a ``'`` (OWASP), which shows it
    as written. Numbers stay numbers, and so does a text that is only a number (``-0.5``).

    >>> spreadsheet_safe("=1+2"), spreadsheet_safe("-0.5"), spreadsheet_safe(-0.5)
    ("'=1+2", '-0.5', -0.5)
    """
    if (
        isinstance(value, str)
        and value.lstrip(" ").startswith(FORMULA_STARTS)
        and not _NUMBER.fullmatch(value.strip(" "))
    ):
        return "'" + value
    return value
