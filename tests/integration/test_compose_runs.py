"""Composition (extends, environments, overrides) and search-space power on real studies."""

import json

from optuna.trial import TrialState
from rich.console import Console

from hpo import load_study
from hpo.study.loop import run_study

quiet = Console(quiet=True)


def test_conditional_parameters_in_trials(write_study):
    path = write_study(
        n_trials=4,
        search_space={
            "optim": {"type": "categorical", "choices": ["sgd", "adamw_torch"]},
            "adam_beta2": {"type": "float", "low": 0.9, "high": 0.999, "when": {"optim": "adamw_torch"}},
            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        },
        sampler={"name": "random", "seed": 3},
    )
    study = run_study(load_study(path), quiet)
    assert {t.params["optim"] for t in study.trials} == {"sgd", "adamw_torch"}
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        assert ("adam_beta2" in t.params) == (t.params["optim"] == "adamw_torch")


def test_derived_lora_alpha_reaches_the_adapter(write_study, tiny_model):
    path = write_study(
        n_trials=2,
        model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"]}},
        search_space={"r": {"type": "categorical", "choices": [2, 4]}, "lora_alpha": {"derive": "2 * r"}},
    )
    study = run_study(load_study(path), quiet)
    for t in study.trials:
        assert t.user_attrs["derived_params"] == {"lora_alpha": 2 * t.params["r"]}
    adapter = json.loads((path.parent / "outputs" / "tiny" / "best_model" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 2 * adapter["r"] == 2 * study.best_params["r"]


def test_constraints_reject_before_training(write_study):
    path = write_study(
        n_trials=3,
        search_space={
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]},
            "gradient_accumulation_steps": {"type": "categorical", "choices": [1, 2]},
        },
        constraints=["per_device_train_batch_size * gradient_accumulation_steps <= 8"],
        sampler={"name": "random", "seed": 1},
    )
    study = run_study(load_study(path), quiet)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    rejected = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(done) == 3 and rejected, "seed 1 samples 8 x 2 at least once"
    for t in done:
        assert t.params["per_device_train_batch_size"] * t.params["gradient_accumulation_steps"] <= 8
    for t in rejected:
        assert t.params == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}
        assert "train_seconds" not in t.user_attrs  # it never trained
        assert t.user_attrs["rejected_by_constraint"].startswith("per_device_train_batch_size")


def test_a_constraint_on_an_inactive_parameter_does_not_apply(write_study):
    # momentum exists only for sgd: with adamw the constraint has nothing to check (it used to fail the trial).
    path = write_study(
        n_trials=2,
        search_space={
            "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
            "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optimizer": "sgd"}},
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        constraints=["momentum <= 0.95"],
        enqueue=[{"optimizer": "adamw", "learning_rate": 1e-3}],
    )
    study = run_study(load_study(path), quiet)
    first = study.trials[0]
    assert first.params["optimizer"] == "adamw" and first.state.name == "COMPLETE"
