"""The report in a terminal: each group's study table and its top trials as rich tables, and the best parameters
that sit at the edge of their range (``hpo report`` prints them beside the CSV and HTML it writes)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hpo.results.tables import GROUP, SUMMARY_COLUMNS, by_group


def print_tables(console: Console, trials: pd.DataFrame, summary: pd.DataFrame, include_pruned: bool = False) -> None:
    """Print ``summary`` (from :func:`hpo.results.tables.studies_frame`) and the top 10 of ``trials`` per group."""
    for label, rows in by_group(summary):  # a rank is only ever shown beside the group it ranks in
        console.print(
            _table(
                rows,
                [c for c in SUMMARY_COLUMNS if c not in (*GROUP, "score")],  # the group is in the title
                f"studies: {label}",
            )
        )
    for row in summary.itertuples():
        for warning in filter(None, row.at_edge.split("; ")):
            console.print(f"[yellow]at the edge[/] ({escape(row.study)}): {escape(warning)}")
    pruned = "; pruned ranked on their last intermediate value" if include_pruned else ""
    for label, rows in by_group(trials):
        if "pareto" in rows:  # several objectives: the front first, each in rank order
            rows = rows.sort_values("pareto", ascending=False, kind="stable", key=lambda c: c.fillna(False))
        # columns of the features a study uses (several objectives, repeats, data.test), only when it does
        used = [c for c in ("pareto", "value_std", "test_loss", "finalist") if c in rows and rows[c].notna().any()]
        columns = ["rank", "study", "trial", "state", *[c for c in used if c == "pareto"], "objective"]
        columns += [*[c for c in used if c != "pareto"], "eval_accuracy", "optimizer_steps"]
        console.print(
            _table(
                rows.head(10),
                [*columns, "score"],
                f"top 10 trials: {label}{pruned} (params in the CSV and HTML)",
            )
        )
        if "finalist" in used:
            _disagree(console, rows)


def _disagree(console: Console, rows: pd.DataFrame) -> None:
    """Say, per study, when the objective's best and the best finalist by generation (``finalist``) differ."""
    for study, mine in rows[rows["final"]].sort_values("rank").groupby("study", sort=False):
        if mine["finalist"].notna().any():
            first, by_generation = mine.iloc[0], mine.loc[mine["finalist"].idxmax()]
            if first["trial"] != by_generation["trial"]:
                console.print(
                    f"[yellow]the rankings disagree[/] ({escape(str(study))}): the objective ranks trial "
                    f"{first['trial']} first, the finalists' generations trial {by_generation['trial']}"
                )


def _table(df: pd.DataFrame, columns: Sequence[str], title: str) -> Table:
    table = Table(title=title)
    columns = [c for c in columns if c in df]
    for c in columns:
        table.add_column(c.replace("_", " "), justify="right", overflow="fold")
    for _, row in df[columns].iterrows():
        table.add_row(*("" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def print_finalists(console: Console, metric: str, found: dict) -> None:
    """``hpo best``: the finalists ranked by what they generated, beside their order by the objective; said when
    the two put another trial first, or when the objective's first was not scored."""
    rank_by, order, ranked = found["rank_by"], found["by_objective"], found["ranked"]
    console.print(f"finalists by {metric}: " + ", ".join(f"trial {n}" for n in order), markup=False)
    shown = []
    for f in ranked:
        scores = ", ".join(f"{k}={v:.4f}" for k, v in f.get("scores", {}).items())
        shown.append(f"trial {f['trial']} ({scores or 'no generation: ' + f.get('error', '')})")
    console.print(f"finalists by {rank_by}: " + "; ".join(shown), markup=False)
    scored = [f["trial"] for f in ranked if "scores" in f]
    if order and order[0] not in scored:
        console.print(f"[yellow]trial {order[0]}, first by {escape(metric)}, has no {escape(rank_by)} score[/]")
    elif scored and scored[0] != order[0]:
        console.print(
            f"[yellow]the rankings disagree[/]: {escape(metric)} ranks trial {order[0]} first, {escape(rank_by)} "
            f"trial {scored[0]} (hpo best --trial {scored[0]} writes its configuration)",
        )
