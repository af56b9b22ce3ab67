"""hpo's own knobs on a real Trainer: optimizers, step and plateau schedules, layer-wise rates, scaling, heads."""

import math

import pytest
from rich.console import Console

from hpo import load_study
from hpo.study.loop import run_study

quiet = Console(quiet=True)
FIXED = {"per_device_train_batch_size": {"type": "categorical", "choices": [4]}}  # 48 rows: 12 steps per epoch


def one_trial(write_study, **train):
    path = write_study(n_trials=1, search_space=FIXED, train={"num_train_epochs": 2, "seed": 0, **train})
    (trial,) = run_study(load_study(path), quiet).trials
    assert trial.state.name == "COMPLETE", trial.user_attrs.get("fail_reason")
    return trial


def test_step_schedule_sgd_and_a_head_rate_ten_times_the_body(write_study):
    attrs = one_trial(
        write_study,
        learning_rate=1e-3,
        optimizer="sgd",
        momentum=0.9,
        head_lr_multiplier=10,
        lr_scheduler_type="step",
        lr_step_size=5,
        lr_gamma=0.5,
    ).user_attrs
    assert attrs["optimizer"] == "SGD"
    assert attrs["optimizer_kernel"] == "fused"
    steps = attrs["optimizer_steps"]
    groups = attrs["param_groups"]
    head = [g for g in groups if g["head"]]
    assert sum(g["parameters"] for g in head) == 32 * 3 + 3  # the new classifier: hidden 32 → 3 labels
    for g in groups:
        rate = 1e-2 if g["head"] else 1e-3
        assert g["lr"] == pytest.approx(rate)
        assert g["final_lr"] == pytest.approx(rate * 0.5 ** (steps // 5))  # halved every 5 optimizer steps


def test_plateau_schedule_follows_the_eval_loss(write_study):
    # at lr 1e-7 the eval loss barely moves, so most evaluations are plateaus
    trial = one_trial(
        write_study,
        learning_rate=1e-7,
        lr_scheduler_type="reduce_lr_on_plateau",
        lr_plateau_factor=0.5,
        lr_plateau_patience=0,
    )
    expected, best = 1e-7, math.inf
    for loss in trial.intermediate_values.values():  # the eval losses, in order
        if loss < best * (1 - 1e-4):  # ReduceLROnPlateau's default relative threshold
            best = loss
        elif expected * 0.5 < expected - 1e-8:  # and its eps: a smaller step than 1e-8 is skipped
            expected *= 0.5
    assert expected < 1e-7, "the eval loss plateaued at least once"
    for g in trial.user_attrs["param_groups"]:
        assert g["lr"] == pytest.approx(1e-7)
        assert g["final_lr"] == pytest.approx(expected)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "adafactor"])
def test_optimizers_by_name_with_an_absolute_head_rate(write_study, optimizer):
    attrs = one_trial(
        write_study, learning_rate=1e-3, optimizer=optimizer, head_learning_rate=0.05, lr_scheduler_type="constant"
    ).user_attrs
    assert attrs["optimizer"].lower() == {"adamw": "adamw"}.get(optimizer, optimizer)
    # torch's fused kernel where it has one for the device (CPU too), else its foreach one; never the for-loop
    assert attrs["optimizer_kernel"] == {"rmsprop": "foreach", "adafactor": "for-loop"}.get(optimizer, "fused")
    assert {g["head"]: g["final_lr"] for g in attrs["param_groups"]} == {True: 0.05, False: 1e-3}


def test_linear_lr_scaling(write_study):
    attrs = one_trial(
        write_study,
        learning_rate=1e-3,
        lr_scaling="linear",
        lr_base_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="constant",
    ).user_attrs
    assert [g["lr"] for g in attrs["param_groups"]] == pytest.approx([1e-3 * 4 * 2 / 2] * 2)  # batch 4 × accumulation 2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_clipping_and_label_smoothing(write_study, tiny_model, lora):
    model = {"name": str(tiny_model), "lora": {"r": 4}} if lora else str(tiny_model)
    path = write_study(
        n_trials=1,
        model=model,
        search_space={
            "max_grad_norm": {"type": "float", "low": 0.1, "high": 1.0},
            "label_smoothing_factor": {"type": "float", "low": 0.0, "high": 0.2},
        },
        train={"num_train_epochs": 1, "gradient_checkpointing": True},
    )
    (trial,) = run_study(load_study(path), quiet).trials
    assert trial.state.name == "COMPLETE", trial.user_attrs.get("fail_reason")
