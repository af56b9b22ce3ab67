"""End to end on a tiny BERT: real Trainer, real SQLite, real pruners."""

import contextlib
import json
import sqlite3

import optuna
from optuna.trial import TrialState
from rich.console import Console

from hpo import load_study, run_study
from hpo.trial import prepare

quiet = Console(quiet=True)


def test_study_runs_to_n_trials_and_resumes(write_study, storage_url, request):
    name = f"tiny-{request.node.callspec.id}-{id(storage_url)}"  # PostgreSQL is shared by the session
    path = write_study(n_trials=2, storage=storage_url, study=name)
    study = run_study(load_study(path), quiet)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2

    run_study(load_study(path), quiet)  # holds 2 already: adds none
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert len(study.trials) == 2

    run_study(load_study(path, {"n_trials": 3}), quiet)  # raise the target: adds exactly 1
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert len(study.trials) == 3
    assert study.user_attrs["config"]["storage"].startswith(storage_url.split(":")[0])  # storage round-trip


def test_default_storage_is_sqlite_beside_the_study_file(write_study):
    path = write_study(n_trials=1)
    run_study(load_study(path), quiet)
    assert optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}").trials
    with contextlib.closing(sqlite3.connect(path.with_suffix(".db"))) as db:  # readers never block the writer
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_trial_records_measurements_and_best_model(write_study, tmp_path):
    path = write_study(n_trials=2)
    study = run_study(load_study(path), quiet)
    attrs = study.best_trial.user_attrs
    for key in ("best_eval_loss", "last_eval_loss", "eval_accuracy", "eval_f1_macro", "optimizer_steps",
                "train_seconds", "samples_per_second", "peak_memory_mb", "device"):
        assert key in attrs, key
    assert attrs["device"] == "cpu"
    assert attrs["last_eval_loss"] == study.best_value
    assert 0 < attrs["seconds_to_first_step"] < attrs["train_seconds"] + 60 and attrs["rss_mb"] > 50
    best = tmp_path / "outputs" / "tiny" / "best_model"
    assert json.loads((best / "hpo_trial.json").read_text())["trial"] == study.best_trial.number
    assert (best / "model.safetensors").exists() and (best / "tokenizer.json").exists()
    config = study.user_attrs["config"]
    assert config["n_trials"] == 2 and config["storage"].startswith("sqlite:///")
    assert (tmp_path / "outputs" / "tiny" / "resolved.yaml").exists()


def test_less_padding_by_default_length_grouped_batches_and_sorted_eval_rows(write_study):
    cfg = load_study(write_study(n_trials=1))
    lengths = [len(row["input_ids"]) for row in prepare(cfg).eval_rows]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    (trial,) = run_study(cfg, quiet).trials
    assert trial.user_attrs["train_sampling_strategy"] == "group_by_length"
    # the study file's choice wins
    (trial,) = run_study(load_study(write_study(study="shuffled", n_trials=1,
                                                train={"num_train_epochs": 1, "train_sampling_strategy": "random"})), quiet).trials
    assert trial.user_attrs["train_sampling_strategy"] == "random"


def test_steps_count_examples_seen_on_one_grid(write_study):
    # 36 train rows, eval every 0.5 epochs = 18 examples: batch 4 and batch 8 x accumulation 2
    # report at the same steps, whatever their number of optimizer steps.
    path = write_study(n_trials=2, search_space={
        "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]},
        "gradient_accumulation_steps": {"type": "categorical", "choices": [1, 2]},
    }, sampler={"name": "grid"})
    study = run_study(load_study(path, {"n_trials": 4}), quiet)
    steps = {tuple(sorted(t.intermediate_values)) for t in study.trials}
    assert steps == {(18, 36, 54, 72)}
    assert {t.user_attrs["optimizer_steps"] for t in study.trials} == {18, 10, 6}  # 4x1, 4x2 and 8x1, 8x2 (last batch of an epoch is short)


def test_pruner_prunes(write_study):
    # ThresholdPruner(upper=0) prunes every trial at its first report: deterministic.
    path = write_study(n_trials=2, pruner={"name": "threshold", "upper": 0.0})
    study = run_study(load_study(path), quiet)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for t in study.trials:
        assert list(t.intermediate_values) == [18]
        assert t.user_attrs["pruned_at_step"] == 18
    assert not (path.parent / "outputs" / "tiny" / "best_model").exists()


def test_median_pruner_prunes_a_bad_trial(write_study):
    from hpo.study import open_study

    path = write_study(n_trials=2, pruner={"name": "median", "n_startup_trials": 1},
                       search_space={"learning_rate": {"type": "categorical", "choices": [3e-3, 1e-9]}})
    cfg = load_study(path)
    for lr in (3e-3, 1e-9):  # a good trial first, then one that cannot learn
        open_study(cfg).enqueue_trial({"learning_rate": lr})
    study = run_study(cfg, quiet)
    assert [(t.params["learning_rate"], t.state) for t in study.trials] == [
        (3e-3, TrialState.COMPLETE), (1e-9, TrialState.PRUNED)]


def test_lora_trials_train_adapters_only(write_study, tiny_model):
    path = write_study(n_trials=2, search_space={
        "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "r": {"type": "categorical", "choices": [2, 4]},
        "lora_alpha": {"type": "categorical", "choices": [4, 8]},
    }, model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"]}})
    study = run_study(load_study(path), quiet)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:  # adapters + the new head: a small share of the tiny BERT's ~30k parameters
        assert 0 < t.user_attrs["trainable_parameters"] < 5000
    assert (path.parent / "outputs" / "tiny" / "best_model" / "adapter_config.json").exists()


def test_failure_is_recorded_with_its_cause_and_the_study_goes_on(write_study):
    # TrainingArguments accepts a batch size of 0; the DataLoader refuses it once training starts.
    path = write_study(n_trials=1, max_failures_in_a_row=2,
                       search_space={"per_device_train_batch_size": {"type": "categorical", "choices": [0]}})
    study = run_study(load_study(path), quiet)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 2  # stopped after max_failures_in_a_row instead of looping forever
    assert "batch_size" in failed[0].user_attrs["fail_reason"]
    assert failed[0].value is None  # a failure is a state, never a number


def test_dropout_reaches_the_model_config(write_study, tiny_model):
    from hpo.recipe import Recipe
    from hpo.trial import _build_model, prepare

    bench = prepare(load_study(write_study()))
    model, _ = _build_model(bench, {"dropout": 0.37}, {}, Recipe())
    assert model.config.hidden_dropout_prob == 0.37
    assert model.config.attention_probs_dropout_prob == 0.37
    assert model.config.num_labels == 3
