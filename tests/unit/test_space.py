import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo.distributions import compile_space, sample
from hpo.space import Param, searchable_names, split_params, training_argument_names


def test_every_type_compiles():
    space = compile_space(
        {
            "learning_rate": Param(type="float", low=1e-5, high=1e-3, log=True),
            "weight_decay": Param(type="float", low=0.0, high=0.1, step=0.05),
            "num_train_epochs": Param(type="int", low=1, high=5),
            "warmup_steps": Param(type="int", low=0, high=100, step=10),
            "per_device_train_batch_size": Param(type="categorical", choices=[8, 16, 32]),
            "lr_scheduler_type": Param(type="categorical", choices=["linear", "cosine"]),
        }
    )
    assert space["learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["weight_decay"] == FloatDistribution(0.0, 0.1, step=0.05)
    assert space["num_train_epochs"] == IntDistribution(1, 5)
    assert space["warmup_steps"] == IntDistribution(0, 100, step=10)
    assert space["per_device_train_batch_size"] == CategoricalDistribution([8, 16, 32])
    assert space["lr_scheduler_type"] == CategoricalDistribution(["linear", "cosine"])


def test_sample_stays_inside_the_space_and_records_the_distributions():
    entries = {
        "learning_rate": Param(type="float", low=1e-5, high=1e-3, log=True),
        "warmup_steps": Param(type="int", low=0, high=100, step=10),
        "r": Param(type="categorical", choices=[4, 8]),
    }
    space = compile_space(entries)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        params, derived = sample(trial, entries, space)
        assert derived == {}
        assert 1e-5 <= params["learning_rate"] <= 1e-3
        assert params["warmup_steps"] % 10 == 0 and 0 <= params["warmup_steps"] <= 100
        assert params["r"] in (4, 8)
        study.tell(trial, 0.0)
    assert study.trials[0].distributions == space


def test_split_params_by_owner():
    training, model, lora = split_params({"learning_rate": 1e-4, "dropout": 0.1, "r": 8, "lora_alpha": 16})
    assert training == {"learning_rate": 1e-4}
    assert model == {"dropout": 0.1}
    assert lora == {"r": 8, "lora_alpha": 16}


def test_training_argument_names_match_the_dataclass():
    from dataclasses import fields

    from transformers import TrainingArguments

    assert training_argument_names() == {f.name for f in fields(TrainingArguments) if f.init}
    assert {"learning_rate", "dropout", "r", "lora_alpha"} <= searchable_names()
    assert "output_dir" not in searchable_names()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "float", "low": 0.1, "high": 0.01}, "low=0.1 > high=0.01"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log=true needs low > 0"),
        ({"type": "int", "low": 1.5, "high": 4}, "whole numbers"),
        ({"type": "categorical", "choices": []}, "non-empty"),
        ({"type": "categorical", "choices": [1, "a"]}, "mix types"),
        ({"type": "float", "low": 1e-5}, "needs both"),
    ],
)
def test_inconsistent_entries_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        Param(**spec)


def test_conditional_and_derived_parameters():
    entries = {
        "optim": Param(type="categorical", choices=["sgd", "adamw_torch"]),
        "momentum": Param(type="float", low=0.5, high=0.99, when={"optim": "sgd"}),
        "r": Param(type="categorical", choices=[4, 8]),
        "lora_alpha": Param(derive="2 * r"),
        "warmup_steps": Param(derive="min(100, max_steps // 10)", when={"optim": ["sgd"]}),
    }
    space = compile_space(entries)
    assert set(space) == {"optim", "momentum", "r"}  # derived values are computed, not sampled
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params, derived = sample(trial, entries, space, {"max_steps": 500})
        seen.add(params["optim"])
        assert ("momentum" in params) == (params["optim"] == "sgd")
        assert derived["lora_alpha"] == 2 * params["r"]
        assert derived.get("warmup_steps") == (50 if params["optim"] == "sgd" else None)
        study.tell(trial, 0.0)
    assert seen == {"sgd", "adamw_torch"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"derive": "2 * r", "type": "int"}, "derive' (and 'when') only"),
        ({"derive": "__import__('os').system('true')"}, "is not allowed"),
        ({"derive": "r if r else 2"}, "is not allowed"),
        ({"derive": "r +"}, "cannot parse"),
        ({"low": 1, "high": 2}, "give 'type'"),
    ],
)
def test_bad_derived_entries(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Param(**spec)


@pytest.mark.parametrize(
    "source, values, message",
    [
        ("0 * ((((9**64)**64)**64)**64)**64", {}, "is over 2**1024"),  # used to hang every trial
        ("10**10**10", {}, "exponent 10000000000 is over 64"),
        ("1e308 * 10", {}, "overflow"),
        (
            "x * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60 * 2**60",
            {"x": 1},
            "a value over 2**1024",
        ),
        ("2 * optim", {"optim": "sgd"}, "arithmetic on 'sgd', which is not a number"),  # "sgdsgd" before
        ("(0 - 8) ** 0.5", {}, "not a real number"),
        ("1 / (r - 4)", {"r": 4}, "division by zero"),
    ],
)
def test_expressions_are_bounded(source, values, message):
    from hpo.expr import Expression

    with pytest.raises(ValueError, match=re.escape(message)):
        Expression(source).evaluate(values)


@pytest.mark.parametrize(
    "source, message",
    [
        ("max(r)", "max() takes two or more values"),  # max(8) raised TypeError in every trial
        ("min(*r)", "is not allowed"),
        ("-" * 100 + "r", "nested deeper than 50 levels"),
        ("(" * 300 + "r" + ")" * 300, "cannot parse"),
        ("r + " * 300 + "r", "longer than 1000 characters"),
        ("9" * 5000, "longer than 1000 characters"),
    ],
)
def test_expressions_that_cannot_be_evaluated_do_not_parse(source, message):
    from hpo.expr import Expression

    with pytest.raises(ValueError, match=re.escape(message)):
        Expression(source)


def test_corners_cover_every_extreme_and_random_points():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hpo.distributions import corners

    dists = {
        "lr": FloatDistribution(1e-5, 1e-3, log=True),
        "bs": CategoricalDistribution([4, 8, 16]),
        "n": IntDistribution(1, 9, step=2),
    }
    points = corners(dists, n_random=10)
    assert len(points) == 2 * 3 * 2 + 10
    assert {(p["lr"], p["bs"], p["n"]) for p in points[:12]} == {
        (lr, bs, n) for lr in (1e-5, 1e-3) for bs in (4, 8, 16) for n in (1, 9)
    }
    for p in points[12:]:
        assert 1e-5 <= p["lr"] <= 1e-3 and p["bs"] in (4, 8, 16) and p["n"] in (1, 3, 5, 7, 9)


def test_a_best_value_at_the_edge_of_its_range_names_the_bound_to_move():
    from hpo.distributions import at_edges

    lr = FloatDistribution(1e-5, 1e-3, log=True)  # log-scaled: 1.2e-5 is 4% of the way up, 5e-5 is 35%
    assert at_edges({"learning_rate": 1.2e-5}, {"learning_rate": lr}) == [
        "search_space.learning_rate: the best value 1.2e-05 is at the low end of [1e-05, 0.001] (within 5%): lower low"
    ]
    assert at_edges({"learning_rate": 5e-5}, {"learning_rate": lr}) == []
    # Linear: 0.098 of [0, 0.1] is at the top; 0.006 (6%) is not at the bottom.
    wd = FloatDistribution(0.0, 0.1)
    assert at_edges({"weight_decay": 0.098}, {"weight_decay": wd})[0].endswith("raise high")
    assert at_edges({"weight_decay": 0.006}, {"weight_decay": wd}) == []
    assert at_edges({"epochs": 2}, {"epochs": IntDistribution(2, 6)})[0].endswith("lower low")
    # Nothing lies below 0 for a float, 1 for an integer: the quickstart's best run said "add a smaller one" of
    # gradient accumulation 1, and would of dropout 0.
    assert at_edges({"epochs": 1}, {"epochs": IntDistribution(1, 5)}) == []
    assert at_edges({"accumulation": 1}, {"accumulation": CategoricalDistribution([1, 2, 4])}) == []
    assert at_edges({"dropout": 0.001}, {"dropout": FloatDistribution(0.0, 0.3)}) == []
    # Numeric choices, three or more: the largest or smallest one; two choices or words say nothing.
    batch = CategoricalDistribution([8, 16, 32])
    assert at_edges({"batch": 32}, {"batch": batch}) == [
        "search_space.batch: the best value 32 is the largest choice: add a larger one"
    ]
    assert at_edges({"batch": 16}, {"batch": batch}) == []
    assert at_edges({"b": 8}, {"b": CategoricalDistribution([8, 16])}) == []
    assert at_edges({"s": "cosine"}, {"s": CategoricalDistribution(["linear", "cosine", "constant"])}) == []
    assert at_edges({"f": True}, {"f": CategoricalDistribution([False, True, None])}) == []
    assert at_edges({"x": 0.5}, {"x": FloatDistribution(0.5, 0.5)}) == []  # a single value has no edge to move
    assert at_edges({"n": 2}, {"n": IntDistribution(1, 2)}) == []  # two values: both are edges, nothing to say
