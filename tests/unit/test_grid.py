"""The grid sampler's points, taken from the search space: categorical choices, stepped ints and stepped floats.

Float steps are where a grid goes wrong: 0.1 has no exact binary value, so adding steps drifts past ``high``.
"""

import itertools
import warnings

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo.samplers import MAX_GRID_POINTS, _grid_size, _grid_values, make_sampler


def suggest(trial, name, d):
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)


def grid_points(space, args=None):
    """Every point a grid study over ``space`` trains, run until the sampler stops it; optuna's warnings are errors."""
    study = optuna.create_study(storage=None, sampler=make_sampler("grid", args or {}, space))
    points = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "The value ... is out of range of the parameter"
        study.optimize(
            lambda trial: points.append(tuple(suggest(trial, k, d) for k, d in space.items())) or 0.0, n_trials=1000
        )
    return points


@pytest.mark.parametrize(
    "low, high, step, expected",
    [
        (0.0, 1.0, 0.1, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        (0.05, 0.2, 0.05, [0.05, 0.1, 0.15, 0.2]),
        (0.5, 2.5, 0.5, [0.5, 1.0, 1.5, 2.0, 2.5]),
        (0.0, 0.1, 0.05, [0.0, 0.05, 0.1]),
        (0.0, 0.3, 0.1, [0.0, 0.1, 0.2, 0.3]),
        (0.1, 0.7, 0.2, [0.1, 0.3, 0.5, 0.7]),
        (1e-5, 3e-5, 1e-5, [1e-5, 2e-5, 3e-5]),
        (0.0, 1.0, 0.3, [0.0, 0.3, 0.6, 0.9]),  # optuna cuts high to 0.9, the last step
    ],
)
def test_float_steps_give_every_point_from_low_to_high_inside_the_range(low, high, step, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optuna: "the range is not divisible by `step`"
        d = FloatDistribution(low, high, step=step)
    values = _grid_values("x", d)
    assert len(values) == _grid_size("x", d) == len(expected)
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[0] == d.low and values[-1] == d.high  # the ends as written, not an ulp beyond
    assert all(d._contains(v) for v in values)  # what optuna checks before it warns "out of range"


def test_int_steps_and_choices_are_listed_as_given():
    assert _grid_values("n", IntDistribution(0, 100, step=25)) == [0, 25, 50, 75, 100]
    assert _grid_values("n", IntDistribution(1, 10, step=3)) == [1, 4, 7, 10]
    assert _grid_values("o", CategoricalDistribution(["sgd", "adamw", None])) == ["sgd", "adamw", None]
    assert _grid_size("n", IntDistribution(0, 100, step=25)) == 5


def test_a_grid_study_asks_every_combination_once():
    space = {
        "optim": CategoricalDistribution(["sgd", "adamw"]),
        "warmup_steps": IntDistribution(0, 20, step=10),
        "weight_decay": FloatDistribution(0.0, 0.1, step=0.05),
    }
    points = grid_points(space)
    assert len(points) == 2 * 3 * 3
    assert set(points) == set(itertools.product(["sgd", "adamw"], [0, 10, 20], [0.0, 0.05, 0.1]))


def test_a_grid_study_over_tenths_trains_only_values_in_its_range():
    points = grid_points({"lora_dropout": FloatDistribution(0.0, 0.3, step=0.1)})
    assert sorted(points) == [(0.0,), (0.1,), (0.2,), (0.3,)]


def test_a_grid_larger_than_the_cap_is_refused_before_it_is_listed():
    space = {"a": IntDistribution(0, 1000), "b": FloatDistribution(0.0, 100.0, step=0.001)}  # 1001 × 100001 points
    with pytest.raises(ValueError, match=f"the grid has 100,101,001 points \\(at most {MAX_GRID_POINTS:,}\\)"):
        make_sampler("grid", {}, space)
    make_sampler("grid", {}, {"a": IntDistribution(1, MAX_GRID_POINTS)})  # exactly the cap is fine


@pytest.mark.parametrize(
    "d",
    [FloatDistribution(1e-5, 1e-3, log=True), FloatDistribution(0.0, 1.0), IntDistribution(1, 64, log=True)],
    ids=["log-float", "float", "log-int"],
)
def test_a_parameter_without_steps_cannot_be_a_grid(d):
    with pytest.raises(ValueError, match="grid sampler needs categorical or stepped parameters; 'x' is continuous"):
        make_sampler("grid", {}, {"x": d, "y": CategoricalDistribution([1, 2])})


def test_a_grid_given_in_the_sampler_arguments_is_kept():
    space = {"x": FloatDistribution(1e-5, 1e-3, log=True)}  # continuous: fine when the grid is given
    assert sorted(grid_points(space, {"search_space": {"x": [1e-4, 1e-3]}})) == [(1e-4,), (1e-3,)]
