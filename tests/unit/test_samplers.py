"""Samplers and pruners by name, tested the way Optuna tests them: ask, report, tell, made-up values."""

import optuna
import pytest
from optuna.distributions import FloatDistribution

from hpo import ConfigError, load_study
from hpo.samplers import make_pruner, make_sampler

SPACE = {"x": FloatDistribution(0.0, 1.0)}


def test_patient_without_wrapped_prunes_on_patience_like_optuna():
    # hpo used to wrap a no-op pruner, which never prunes; Optuna's PatientPruner(None, 1) does.
    pruner = make_pruner("patient", {"patience": 1})
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    pruned = []
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):  # never improves
        trial.report(value, step)
        pruned.append(trial.should_prune())
    assert pruned == [False, False, True, True]
    reference = optuna.pruners.PatientPruner(None, patience=1)
    assert type(pruner) is type(reference) and pruner._wrapped_pruner is None


def test_median_and_percentile_start_pruning_after_three_finished_trials_unless_told():
    # the measured default (benchmarks/pruning.py): Optuna's 5 saved ~10 points less training on two data sizes
    assert make_pruner("median", {})._n_startup_trials == 3
    assert make_pruner("percentile", {"percentile": 25.0})._n_startup_trials == 3
    assert make_pruner("median", {"n_startup_trials": 5})._n_startup_trials == 5


def test_patient_wraps_the_named_pruner():
    pruner = make_pruner("patient", {"patience": 2, "wrapped": {"name": "median", "n_startup_trials": 1}})
    assert isinstance(pruner._wrapped_pruner, optuna.pruners.MedianPruner)
    assert pruner._wrapped_pruner._n_startup_trials == 1


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("tpe", {"n_startup_trials": "ten"}, "n_startup_trials: 'ten' is not int"),
        ("tpe", {"gamma": 5}, "gamma: 5 is not"),
        ("random", {"seed": 1.5}, "seed: 1.5 is not"),
        ("nsga2", {"population_size": [50]}, "population_size: [50] is not int"),
    ],
)
def test_wrong_typed_sampler_arguments_fail_at_construction(name, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_sampler(name, args, SPACE)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("median", {"n_warmup_steps": "x"}, "n_warmup_steps: 'x' is not int"),
        ("threshold", {"upper": "high"}, "upper: 'high' is not"),
        ("patient", {"patience": 1, "wrapped": "median"}, "wrapped: a pruner like {name: median}"),
    ],
)
def test_wrong_pruner_arguments_fail_at_construction(name, args, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        make_pruner(name, args)


def test_lax_numbers_are_converted():
    assert make_sampler("tpe", {"n_startup_trials": "3"}, SPACE)._n_startup_trials == 3


def test_dry_run_asks_reports_and_tells():
    from hpo.samplers import dry_run

    study_sampler = make_sampler("tpe", {"n_startup_trials": 1, "seed": 0}, SPACE)
    dry_run(study_sampler, make_pruner("median", {"n_startup_trials": 0}), SPACE, "minimize")  # raises on trouble


def test_a_sampler_that_fails_only_when_it_runs_fails_validation(write_study):
    # An argument that the constructor takes but that breaks sampling: every trial would fail on it.
    path = write_study(sampler={"name": "tpe", "n_startup_trials": 0, "n_ei_candidates": 0})
    with pytest.raises(ConfigError, match="sampler: tpe sampler with none pruner fails on a test study"):
        load_study(path)
