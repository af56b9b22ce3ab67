"""Reports over real (tiny) studies: Z-scores, CSV, HTML in a real browser, the best config out."""

import json
import os
import shutil

import inprocess
import pandas as pd
import pytest
from rich.console import Console

from hpo import load_study
from hpo.study.loop import run_study

quiet = Console(quiet=True)
CHROMIUM = "/usr/bin/chromium"


def hpo(*args, cwd=None):
    return inprocess.hpo(*args, cwd=cwd, env={"COLUMNS": "160"})


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
