"""The HTML report: one self-contained file (plotly.js inlined once, no CDN) with the tables of
:mod:`hpo.results.tables` and Optuna's plots of each study."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from hpo.attrs import CONFIG
from hpo.results.tables import FINISHED, by_group

MAX_TABLE_ROWS = 200  # trials listed in each group's HTML table, best first
MAX_LINES = 1000  # trials drawn as lines (intermediate values, parallel coordinates): more is unreadable and slow
MAX_FANOVA = 200  # fANOVA costs ~10 ms a trial: all 10,000 of a large study would take 8 minutes


def write_html(studies: Sequence[optuna.Study], trials: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """A single HTML file that opens offline: plotly.js is inlined once, no CDN.

    First the two tables, one per group (``GROUP``: rows compare only within it); then per study:
    optimization history, intermediate values (pruning visible), fANOVA parameter importances,
    parallel coordinates, slices; then the histories of each group's studies side by side.
    """
    sections = _figures(studies, summary)
    tables = _tables(trials, summary)
    names = ", ".join(html.escape(s.study_name) for s in studies)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>hpo report: {names}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}.skipped{color:#888}</style></head>"
        f"<body><h1>hpo report: {names}</h1>{''.join(tables)}{''.join(sections)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _figures(studies: Sequence[optuna.Study], summary: pd.DataFrame) -> list[str]:
    """Per study: history (or Pareto front), intermediate values, importances, parallel coordinates, slices; then
    the histories of each group's studies side by side. A plot that cannot be drawn is a line saying why."""
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
        if len(study.directions) > 1:  # the front, then the first objective's history
            names = [o["metric"] for o in study.user_attrs.get(CONFIG, {}).get("objectives", [])]
            figure("Pareto front", lambda s=study, n=names: vis.plot_pareto_front(s, target_names=n or None))
            name = names[0] if names else "objective 1"
            figure(
                f"Optimization history ({name})",
                lambda s=study, n=name: vis.plot_optimization_history(s, target=lambda t: t.values[0], target_name=n),
            )
        else:
            figure("Optimization history", lambda s=study: vis.plot_optimization_history(s))
        figure(
            f"Intermediate values (pruned trials stop early){_shown(lines, study)}",
            lambda s=lines: vis.plot_intermediate_values(s),
        )
        figure(
            f"Parameter importances (fANOVA){_shown(fanova, study)}",
            lambda s=fanova: vis.plot_param_importances(
                s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            ),
        )
        figure(f"Parallel coordinates{_shown(lines, study)}", lambda s=lines: vis.plot_parallel_coordinate(s))
        figure("Slices", lambda s=study: vis.plot_slice(s))
    by_name = {s.study_name: s for s in studies}
    for label, rows in by_group(summary):  # one axis per objective: a loss and an F1 share no scale
        if len(rows) > 1:
            sections.append(f"<h2>Studies side by side: {html.escape(label)}</h2>")
            figure(
                "Optimization histories", lambda r=rows: vis.plot_optimization_history([by_name[n] for n in r["study"]])
            )
    return sections


def _tables(trials: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """The study table and the trial table (the best :data:`MAX_TABLE_ROWS` trials), one per group."""
    if (~trials["final"] & trials["rank"].notna()).any():
        pruned = (
            "Pruned trials (final = False) are ranked on their last intermediate value, "
            "not a final one (--include-pruned)."
        )
    else:
        pruned = "Pruned trials (final = False) are listed unranked: their objective is a last intermediate value."
    tables = [
        "<h2>Studies</h2><p class='note'>Z-scores, score and rank compare only rows of the same task, "
        f"objective metric and direction; rank 1 is the best of each group. {html.escape(pruned)}</p>"
    ]
    tables += [
        f"<h3>{html.escape(label)}</h3>{rows.to_html(index=False, classes='studies', na_rep='')}"
        for label, rows in by_group(summary)
    ]
    tables.append("<h2>Trials</h2>")
    for label, rows in by_group(trials):
        shown = f" (the best {MAX_TABLE_ROWS} of {len(rows):,}; all in the CSV)" if len(rows) > MAX_TABLE_ROWS else ""
        top = rows.head(MAX_TABLE_ROWS).to_html(index=False, classes="trials", na_rep="", float_format="{:.4g}".format)
        tables.append(f"<h3>{html.escape(label)}{shown}</h3>{top}")
    return tables


def _sample(study: optuna.Study, n: int) -> optuna.Study:
    """``study`` itself, or an in-memory copy with ``n`` of its finished trials drawn at random (seed 0)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    if len(trials) <= n:
        return study
    keep = sorted(np.random.default_rng(0).choice(len(trials), size=n, replace=False))
    sample = optuna.create_study(study_name=study.study_name, directions=study.directions)
    sample.add_trials([trials[i] for i in keep])
    return sample


def _shown(sample: optuna.Study, study: optuna.Study) -> str:
    total = len(study.get_trials(deepcopy=False, states=FINISHED))
    return "" if sample is study else f" — {len(sample.trials):,} of {total:,} trials, drawn at random"
