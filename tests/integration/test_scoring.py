"""What a trial's value means: its best evaluation (objective.at: best), and early stopping."""

import pytest
from conftest import reevaluated, study_dict
from optuna.trial import TrialState
from rich.console import Console

import hpo


def overfitting(model, tmp_path, **changes) -> dict:
    """One trial that overfits 36 rows: a large fixed rate, 30 epochs, evaluated every epoch."""
    settings = {
        "n_trials": 1,
        "train": {"num_train_epochs": 30, "seed": 0, "learning_rate": 1e-2, "per_device_train_batch_size": 4},
        "search_space": {"weight_decay": {"type": "categorical", "choices": [0.0]}},
        "eval_every": 1.0,
        "storage": f"sqlite:///{tmp_path}/s.db",
        "output_dir": str(tmp_path / "outputs"),
    }
    return study_dict(model, **{**settings, **changes})


def test_best_keeps_the_best_evaluations_model_and_early_stopping_ends_the_trial(tiny_model, tmp_path):
    study = overfitting(
        tiny_model, tmp_path, objective={"at": "best"}, early_stopping={"patience": 3, "min_delta": 0.0}
    )
    (trial,) = hpo.run(study, console=Console(quiet=True)).trials
    curve = trial.intermediate_values
    best_step = min(curve, key=curve.get)
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.value == curve[best_step] and trial.user_attrs["scored_step"] == best_step
    # It turned up after its best, waited 3 evaluations, and stopped long before its 30 epochs.
    assert max(curve) == best_step + 3 * 36 and trial.user_attrs["stopped_early"] == max(curve) < 30 * 36
    assert curve[max(curve)] > trial.value
    assert "pruned_at_step" not in trial.user_attrs
    # The model saved is the best evaluation's, not the one training ended with.
    assert reevaluated(study, tmp_path / "outputs" / "best_model") == pytest.approx(trial.value, rel=1e-5)


def test_last_scores_the_model_training_ends_with(tiny_model, tmp_path):
    study = overfitting(
        tiny_model,
        tmp_path,
        train={"num_train_epochs": 8, "seed": 0, "learning_rate": 1e-2, "per_device_train_batch_size": 4},
    )
    (trial,) = hpo.run(study, console=Console(quiet=True)).trials
    assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
    assert reevaluated(study, tmp_path / "outputs" / "best_model") == pytest.approx(trial.value, rel=1e-5)


def test_repeats_score_a_configuration_on_the_mean_of_its_seeds(tiny_model, tmp_path):
    import json
    import statistics

    study = overfitting(
        tiny_model,
        tmp_path,
        repeats=3,
        train={"num_train_epochs": 2, "seed": 7, "learning_rate": 1e-3, "per_device_train_batch_size": 4},
    )
    (trial,) = hpo.run(study, console=Console(quiet=True)).trials
    values = trial.user_attrs["repeat_values"]
    assert trial.user_attrs["seeds"] == [7, 8, 9] and len(set(values)) == 3  # three seeds, three outcomes
    assert trial.value == pytest.approx(statistics.fmean(values))
    assert trial.user_attrs["value_std"] == pytest.approx(statistics.stdev(values))
    assert trial.intermediate_values[max(trial.intermediate_values)] == values[0]  # the curve: the first seed's
    # The model saved is the first seed's, and says so: its own value beside the trial's mean.
    saved = json.loads((tmp_path / "outputs" / "best_model" / "hpo_trial.json").read_text())
    assert saved["value"] == trial.value and saved["model_value"] == values[0] and saved["model_seed"] == 7
    assert reevaluated(study, tmp_path / "outputs" / "best_model") == pytest.approx(values[0], rel=1e-5)
    (row,) = hpo.report(study).trials.to_dict("records")
    assert row["objective"] == trial.value and row["value_std"] == trial.user_attrs["value_std"]


def test_data_test_scores_the_top_trials_once_and_never_chooses(tiny_model, tmp_path):
    from conftest import DATA

    # The held-out file is the eval file itself: a trial's test_loss must then be its final eval loss exactly.
    data = {"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "test": str(DATA / "eval.csv")}
    study = overfitting(
        tiny_model,
        tmp_path,
        n_trials=5,
        data={**data, "max_length": 16},
        train={"num_train_epochs": 2, "seed": 0, "per_device_train_batch_size": 4},
        search_space={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    )
    trials = hpo.run(study, console=Console(quiet=True)).trials
    tested = [t for t in trials if "test_metrics" in t.user_attrs]
    for t in tested:
        assert t.user_attrs["test_metrics"]["test_loss"] == pytest.approx(t.value, rel=1e-5)
    # Evaluated once each, and only the trials that could still end among the best 3 when they finished.
    ranked = sorted(trials, key=lambda t: (t.value, t.number))
    assert {t.number for t in ranked[:3]} <= {t.number for t in tested}
    for t in trials:
        before = sorted(u.value for u in trials[: t.number])
        assert (t.number in {u.number for u in tested}) == (len(before) < 3 or t.value < before[2])
    report = hpo.report(study).trials.set_index("trial")
    shown = report["test_loss"].dropna()
    assert set(shown.index) == {t.number for t in ranked[:3]}  # the report shows the top 3 only
    _, rest = hpo.best(study)
    assert rest["test"]["test_loss"] == pytest.approx(ranked[0].value, rel=1e-5)


def test_pruning_points_evaluate_a_fixed_stratified_subsample_and_the_last_evaluation_every_row(tiny_model, tmp_path):
    runs = {}
    for share in (1, 0.5):
        folder = tmp_path / str(share)
        folder.mkdir()
        grid = {"epochs": 1.0, "subsample": share, "subsample_min_rows": 1}
        study = overfitting(
            tiny_model,
            folder,
            eval_every=grid,
            train={**overfitting(tiny_model, folder)["train"], "num_train_epochs": 4},
        )
        (runs[share],) = hpo.run(study, console=Console(quiet=True)).trials
    full, half = runs[1], runs[0.5]
    assert "eval_subsample_rows" not in full.user_attrs and half.user_attrs["eval_subsample_rows"] == 3  # of 6
    assert half.value == pytest.approx(full.value, abs=1e-6)  # the last evaluation, the value: every row
    steps = sorted(full.intermediate_values)[:-1]
    assert all(half.intermediate_values[s] != pytest.approx(full.intermediate_values[s], abs=1e-6) for s in steps)
