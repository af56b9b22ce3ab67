"""Studies → pandas tables (trials, per-study summary) with Z-scores; CSV and a self-contained HTML report.

Z-scores use the population standard deviation (``ddof=0``), so every ``z_``
column has mean 0 and standard deviation 1 over the rows it compares; a
constant column gives 0, not NaN. Each is oriented so that higher is better.
``score`` is the mean of the quality z-scores (objective, accuracy, macro F1
for trials; best and median objective for studies) and ``rank`` orders by it
(1 = best). Cost metrics (steps, seconds, memory) get z-scores too, outside
the score.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

#: Trial metrics (user attrs): name → (higher is better, counts toward ``score``).
TRIAL_METRICS: dict[str, tuple[bool, bool]] = {
    "objective": (True, True),  # oriented per study: a minimized objective is negated first
    "eval_accuracy": (True, True),
    "eval_f1_macro": (True, True),
    "eval_f1": (True, True),  # token classification, entity level
    "eval_precision": (True, False),
    "eval_recall": (True, False),
    "eval_perplexity": (False, True),  # causal-lm
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
ATTRS = ("best_eval_loss", "last_eval_loss", "eval_accuracy", "eval_f1_macro", "eval_f1", "eval_precision",
         "eval_recall", "eval_perplexity", "optimizer_steps",
         "planned_steps", "examples_seen", "train_seconds", "samples_per_second", "peak_memory_mb",
         "pruned_at_step")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def zscore(x: pd.Series) -> pd.Series:
    """``(x - mean) / std`` with ``ddof=0``; a constant (or single-value) column gives 0 where x is known."""
    x = pd.to_numeric(x, errors="coerce").astype(float)
    if x.nunique() <= 1:  # also spares identical values the float noise of mean and std (z = ±1 from 1e-13)
        return x.where(x.isna(), 0.0)
    return (x - x.mean()) / x.std(ddof=0)


def add_scores(df: pd.DataFrame, metrics: dict[str, tuple[bool, bool]], oriented: Sequence[str] = ()) -> pd.DataFrame:
    """Add ``z_<metric>``, ``score`` and ``rank`` columns; ``oriented`` metrics flip by the row's ``direction``."""
    df = df.copy()
    score_columns = []
    for metric, (higher_is_better, in_score) in metrics.items():
        if metric not in df:
            continue
        values = pd.to_numeric(df[metric], errors="coerce").astype(float)
        if metric in oriented:
            values = values.where(df["direction"] == "maximize", -values)
        elif not higher_is_better:
            values = -values
        df[f"z_{metric}"] = zscore(values)
        if in_score:
            score_columns.append(f"z_{metric}")
    df["score"] = df[score_columns].mean(axis=1, skipna=True) if score_columns else np.nan
    df["rank"] = df["score"].rank(ascending=False, method="min").astype("Int64")
    return df


def trials_frame(studies: Sequence[optuna.Study]) -> pd.DataFrame:
    """One row per finished (complete or pruned) trial of every study, with Z-scores across all rows.

    Columns: study, trial, state, metric, direction, objective, the measured
    attrs (``ATTRS``), ``params_<name>``, ``z_<metric>``, score, rank.
    """
    rows = []
    for study in studies:
        metric = study.user_attrs.get("config", {}).get("objective", {}).get("metric", "objective")
        direction = study.direction.name.lower()
        for t in study.get_trials(deepcopy=False, states=FINISHED):
            row: dict[str, Any] = {"study": study.study_name, "trial": t.number, "state": t.state.name.lower(),
                                   "metric": metric, "direction": direction, "objective": t.value}
            row.update({k: t.user_attrs.get(k) for k in ATTRS})
            row.update({f"params_{k}": v for k, v in {**t.params, **t.user_attrs.get("derived_params", {})}.items()})
            rows.append(row)
    columns = ["study", "trial", "state", "metric", "direction", "objective", *ATTRS]
    df = pd.DataFrame(rows, columns=columns + sorted({c for r in rows for c in r} - set(columns)))
    return add_scores(df, TRIAL_METRICS, oriented=("objective",))


def studies_frame(studies: Sequence[optuna.Study], trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per study: trial counts, best and median objective, steps spent and saved, best params; Z-scores across studies."""
    trials = trials_frame(studies) if trials is None else trials
    rows = []
    for study in studies:
        mine = trials[trials["study"] == study.study_name]
        complete = mine[mine["state"] == "complete"]
        pruned = mine[mine["state"] == "pruned"]
        states = [t.state for t in study.get_trials(deepcopy=False)]
        try:
            best_trial = study.best_trial
        except ValueError:
            best_trial = None
        rows.append({
            "study": study.study_name,
            "metric": mine["metric"].iloc[0] if len(mine) else None,
            "direction": study.direction.name.lower(),
            "n_complete": states.count(TrialState.COMPLETE),
            "n_pruned": states.count(TrialState.PRUNED),
            "n_failed": states.count(TrialState.FAIL),
            "best": best_trial.value if best_trial else np.nan,
            "median": complete["objective"].median() if len(complete) else np.nan,
            "steps_spent": int(mine["optimizer_steps"].fillna(0).sum()),
            "steps_saved_by_pruning": int((pruned["planned_steps"] - pruned["optimizer_steps"]).fillna(0).sum()),
            "best_trial": best_trial.number if best_trial else None,
            "best_params": json.dumps(best_trial.params if best_trial else {}, sort_keys=True),
        })
    return add_scores(pd.DataFrame(rows), STUDY_METRICS, oriented=("best", "median"))


def markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A small Markdown table (for dashboard notes); floats with 4 significant digits."""
    columns = [c for c in columns if c in df]

    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[columns].itertuples(index=False)]
    return "\n".join(lines)


SUMMARY_COLUMNS = ("rank", "study", "metric", "best", "median", "n_complete", "n_pruned", "n_failed",
                   "steps_spent", "steps_saved_by_pruning", "score")


def write_csv(trials: pd.DataFrame, studies: pd.DataFrame, path: Path) -> tuple[Path, Path]:
    """``path`` gets the trials table; ``<stem>.studies.csv`` beside it the per-study one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    studies_path = path.with_name(f"{path.stem}.studies.csv")
    trials.to_csv(path, index=False)
    studies.to_csv(studies_path, index=False)
    return path, studies_path


def write_html(studies: Sequence[optuna.Study], trials: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """A single HTML file that opens offline: plotly.js is inlined once, no CDN.

    Per study: optimization history, intermediate values (pruning visible),
    fANOVA parameter importances, parallel coordinates, slices; then all
    studies' histories side by side, and the two tables.
    """
    import optuna.visualization as vis

    sections: list[str] = []
    first = True

    def figure(title: str, make) -> None:
        nonlocal first
        try:
            fig = make()
        except (ValueError, RuntimeError) as e:  # e.g. importances need two complete trials
            sections.append(f"<p class='skipped'>{html.escape(title)}: {html.escape(str(e))}</p>")
            return
        fig.update_layout(title=title, height=420)
        sections.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))
        first = False

    for study in studies:
        sections.append(f"<h2>{html.escape(study.study_name)}</h2>")
        lines, fanova = _sample(study, MAX_LINES), _sample(study, MAX_FANOVA)
        figure("Optimization history", lambda s=study: vis.plot_optimization_history(s))
        figure(f"Intermediate values (pruned trials stop early){_shown(lines, study)}",
               lambda s=lines: vis.plot_intermediate_values(s))
        figure(f"Parameter importances (fANOVA){_shown(fanova, study)}", lambda s=fanova: vis.plot_param_importances(
            s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
        figure(f"Parallel coordinates{_shown(lines, study)}", lambda s=lines: vis.plot_parallel_coordinate(s))
        figure("Slices", lambda s=study: vis.plot_slice(s))
    if len(studies) > 1:
        sections.append("<h2>Studies side by side</h2>")
        figure("Optimization histories", lambda: vis.plot_optimization_history(list(studies)))
    top = trials.sort_values("rank").head(MAX_TABLE_ROWS)
    shown = f" (the best {MAX_TABLE_ROWS} of {len(trials):,}; all in the CSV)" if len(trials) > MAX_TABLE_ROWS else ""
    tables = (f"<h2>Studies</h2>{summary.to_html(index=False, classes='studies', na_rep='')}"
              f"<h2>Trials{shown}</h2>{top.to_html(index=False, classes='trials', na_rep='', float_format='{:.4g}'.format)}")
    names = ", ".join(html.escape(s.study_name) for s in studies)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>hpo report: {names}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}.skipped{color:#888}</style></head>"
            f"<body><h1>hpo report: {names}</h1>{tables}{''.join(sections)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


MAX_TABLE_ROWS = 200  # trials listed in the HTML table, best first
MAX_LINES = 1000  # trials drawn as lines (intermediate values, parallel coordinates): more is unreadable and slow
MAX_FANOVA = 200  # fANOVA costs ~10 ms a trial: all 10,000 of a large study would take 8 minutes


def _sample(study: optuna.Study, n: int) -> optuna.Study:
    """``study`` itself, or an in-memory copy with ``n`` of its finished trials drawn at random (seed 0)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    if len(trials) <= n:
        return study
    keep = sorted(np.random.default_rng(0).choice(len(trials), size=n, replace=False))
    sample = optuna.create_study(study_name=study.study_name, direction=study.direction)
    sample.add_trials([trials[i] for i in keep])
    return sample


def _shown(sample: optuna.Study, study: optuna.Study) -> str:
    total = len(study.get_trials(deepcopy=False, states=FINISHED))
    return "" if sample is study else f" — {len(sample.trials):,} of {total:,} trials, drawn at random"
