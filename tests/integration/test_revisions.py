"""A changed study file never silently joins the old study: objective refused, other changes recorded as revisions."""

import json
import shutil

import inprocess
import optuna
import pandas as pd
import pytest
import yaml
from rich.console import Console

from hpo import ConfigError, load_study
from hpo.study.loop import run_study

quiet = Console(quiet=True)


def hpo(*args, cwd=None):
    return inprocess.hpo(*args, cwd=cwd, env={"COLUMNS": "400"})


def edit(path, **changes):
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_another_objective_is_refused_and_best_stays_right(write_study, tmp_path):
    # b.yaml reuses a.yaml's study and storage with accuracy (maximize) and another space.
    a = write_study("a.yaml", n_trials=2)
    b = write_study(
        "b.yaml",
        n_trials=2,
        storage=f"sqlite:///{tmp_path / 'a.db'}",
        objective={"metric": "eval_accuracy", "direction": "maximize"},
        search_space={"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
    )
    assert hpo("run", a).returncode == 0
    before = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'a.db'}")
    for extra in ([], ["--allow-changes"]):  # the objective cannot change, even when changes are allowed
        result = hpo("run", b, "--n-trials", 4, *extra)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "b.yaml" in line and "objective" in line and "eval_loss (minimize)" in line
        assert "eval_accuracy (maximize)" in line and "use a new study name" in line
    after = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert len(after.trials) == len(before.trials) == 2
    best = hpo("best", a, "-o", tmp_path / "best.json")
    assert best.returncode == 0 and f"trial {before.best_trial.number}" in best.stdout
    assert hpo("best", b).returncode == 2  # reading the study under another objective is refused too


def test_a_widened_range_is_refused_then_recorded_with_allow_changes(write_study, tmp_path):
    path = write_study(n_trials=2)
    run_study(load_study(path), quiet)
    space = yaml.safe_load(path.read_text())["search_space"]
    space["learning_rate"]["high"] = 0.1
    edit(path, search_space=space, n_trials=3)

    refused = hpo("run", path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "search_space.learning_rate.high: 0.01 → 0.1" in line and "--allow-changes" in line
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}").trials) == 2

    ran = hpo("run", path, "--allow-changes")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert [t.user_attrs["revision"] for t in study.trials] == [0, 0, 1]
    (first, second) = study.user_attrs["revisions"]
    assert second["revision"] == 1 and second["changes"] == ["search_space.learning_rate.high: 0.01 → 0.1"]
    assert second["time"] >= first["time"]
    assert hpo("run", path).returncode == 0  # the new revision is now the study's: no flag needed again

    report = hpo("report", path, "--csv", tmp_path / "trials.csv")
    assert report.returncode == 0, report.stderr
    assert pd.read_csv(tmp_path / "trials.csv").set_index("trial")["revision"].to_dict() == {0: 0, 1: 0, 2: 1}
    best = hpo("best", path, "-o", tmp_path / "best.json")
    rest = json.loads((tmp_path / "best.model.json").read_text())
    assert rest["revision"] == study.best_trial.user_attrs["revision"] and rest["current_revision"] == 1
    assert f"revision {rest['revision']} of 1" in best.stdout


@pytest.mark.parametrize("change", ["data", "train", "eval_every", "model"])
def test_what_makes_trials_comparable_is_fingerprinted(write_study, tmp_path, tiny_model, change):
    from tests.conftest import DATA

    path = write_study(n_trials=1)
    run_study(load_study(path), quiet)
    if change == "data":  # the same path, other content: only the hash can tell
        data = tmp_path / "train.csv"
        shutil.copy(DATA / "train.csv", data)
        edit(path, data={"train": str(data), "eval": str(DATA / "eval.csv"), "max_length": 16})
        run_study(load_study(path), quiet)  # a copy of the same rows is the same data
        with open(data, "a") as f:
            f.write("one more row of text,greeting\n")
    elif change == "train":
        edit(path, train={"num_train_epochs": 3, "seed": 0, "warmup_ratio": 0.1})
    elif change == "eval_every":
        edit(path, eval_every=0.25)
    else:
        edit(path, model={"name": str(tiny_model), "lora": {"r": 4}})
    with pytest.raises(ConfigError, match=f"{change}[.:].*--allow-changes") as refused:
        run_study(load_study(path, {"n_trials": 2}), quiet)
    assert len(refused.value.problems) == 1
    study = run_study(load_study(path, {"n_trials": 2}), quiet, allow_changes=True)
    assert [t.user_attrs["revision"] for t in study.trials] == [0, 1]


def test_sampler_pruner_and_budget_may_change_freely(write_study):
    path = write_study(n_trials=1)
    run_study(load_study(path), quiet)
    edit(path, n_trials=2, sampler={"name": "tpe", "seed": 1}, pruner={"name": "median"}, max_retry=0)
    study = run_study(load_study(path), quiet)
    assert len(study.trials) == 2 and len(study.user_attrs["revisions"]) == 1


def test_two_studies_of_one_name_do_not_share_an_output_folder(write_study, tmp_path):
    # a.yaml and b.yaml both say study: tiny, each with its default SQLite beside it: b's models and logs
    # went into a's outputs/tiny, and a's rerun reported b's model as its best_model without a word.
    a, b = write_study("a.yaml", n_trials=1), write_study("b.yaml", n_trials=1)
    run_study(load_study(a), quiet)
    with pytest.raises(ConfigError, match=r"output_dir: .*holds the outputs of study 'tiny' in .*a\.db.*b\.db"):
        run_study(load_study(b), quiet)
    assert not (tmp_path / "b.db").exists()
    run_study(load_study(b, {"output_dir": "b-outputs"}), quiet)
    saved = json.loads((tmp_path / "outputs" / "tiny" / "best_model" / "hpo_trial.json").read_text())
    assert saved["storage"].endswith("a.db")


def test_hpo_best_refuses_settings_the_best_trial_did_not_run_with(write_study, tmp_path):
    path = write_study(n_trials=1, train={"num_train_epochs": 1, "seed": 0})
    run_study(load_study(path), quiet)
    edit(path, train={"num_train_epochs": 7, "seed": 0, "weight_decay": 0.3})
    result = hpo("best", path, "-o", tmp_path / "best.json")
    assert result.returncode == 2 and not (tmp_path / "best.json").exists()
    (line,) = result.stderr.strip().splitlines()
    assert "train.num_train_epochs: 1 → 7" in line and "revision 0" in line
    trained = hpo("train", path, "--best")
    assert trained.returncode == 2 and "revision 0" in trained.stderr  # refused before any training
    assert not (tmp_path / "outputs" / "tiny" / "final_model").exists()


def test_a_model_replaced_in_its_folder_is_a_change(write_study, tmp_path, tiny_model):
    from transformers import BertConfig, BertModel

    # The model folder also holds 250 training checkpoints, and this study's own file, storage and outputs:
    # a capped walk over every file once hashed the checkpoints and never the weights; the storage and
    # outputs change with every run.
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for k in range(250):
        (model / f"checkpoint-{k:03d}").mkdir()
        (model / f"checkpoint-{k:03d}" / "config.json").write_text("{}")
    path = write_study(name="model/study.yaml", n_trials=1, model=".")
    run_study(load_study(path), quiet)
    run_study(load_study(path, {"n_trials": 2}), quiet)  # its own storage and outputs are no change
    BertModel(BertConfig.from_pretrained(model)).save_pretrained(model)  # the same config, other weights
    with pytest.raises(ConfigError, match=r"model\.files\.model\.safetensors: .*--allow-changes"):
        run_study(load_study(path, {"n_trials": 3}), quiet)


def test_the_fingerprint_holds_the_data_that_was_read(write_study, tmp_path):
    # The data file changes between reading it and recording the study: the study records what trials train on.
    from hpo.trial.workbench import prepare
    from tests.conftest import DATA

    data = tmp_path / "train.csv"
    shutil.copy(DATA / "train.csv", data)
    path = write_study(n_trials=1, data={"train": str(data), "eval": str(DATA / "eval.csv"), "max_length": 16})
    cfg = load_study(path)
    bench = prepare(cfg)
    with open(data, "a") as f:
        f.write("a row written while the run started,greeting\n")
    from hpo.study.loop import run_study as run_with_bench

    run_with_bench(cfg, quiet, bench=bench)
    with pytest.raises(ConfigError, match=r"data\.train\.sha256"):
        run_study(load_study(path, {"n_trials": 2}), quiet)


def test_another_task_is_refused_even_with_allow_changes(write_study, tmp_path):
    # Both report eval_loss, but a token classifier's loss and a sequence classifier's are not comparable.
    from tests.conftest import DATA

    path = write_study(n_trials=1)
    run_study(load_study(path), quiet)
    edit(
        path,
        task="token-classification",
        data={"train": str(DATA / "ner_train.jsonl"), "eval": str(DATA / "ner_eval.jsonl"), "max_length": 16},
    )
    with pytest.raises(ConfigError, match="task: study 'tiny' holds sequence-classification trials"):
        run_study(load_study(path, {"n_trials": 2}), quiet, allow_changes=True)


def test_entries_queued_under_an_older_revision_are_not_trained_outside_the_new_space(write_study):
    path = write_study(
        n_trials=1,
        enqueue=[
            {"learning_rate": 1e-4, "per_device_train_batch_size": 4},
            {"learning_rate": 2e-4, "per_device_train_batch_size": 4},
        ],
    )
    run_study(load_study(path), quiet)  # runs the first entry; the second stays queued
    space = yaml.safe_load(path.read_text())["search_space"]
    space["learning_rate"] = {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}
    edit(path, search_space=space, enqueue=[], n_trials=2)
    study = run_study(load_study(path), quiet, allow_changes=True)
    queued = study.trials[1]
    assert queued.params == {} and queued.user_attrs["rejected_enqueued"] == "learning_rate=0.0002"
    assert "train_seconds" not in queued.user_attrs  # rejected before training
    assert all(1e-3 <= t.params["learning_rate"] <= 1e-2 for t in study.trials[2:])
