"""hpo from Python: a notebook runs, validates, reports and exports a study given as a dict, with no YAML file."""

import pytest
from conftest import study_dict

import hpo


def test_a_bad_dict_names_the_key(tiny_model):
    with pytest.raises(hpo.ConfigError) as e:
        hpo.validate(study_dict(tiny_model, n_trials=0, sampler={"name": "tpee"}))
    text = str(e.value)
    assert "n_trials" in text and "sampler.name" in text and "tpe" in text  # every problem, with a suggestion


def test_the_public_surface():
    assert set(hpo.__all__) >= {
        "run",
        "validate",
        "report",
        "best",
        "train",
        "load_study",
        "StudyConfig",
        "ConfigError",
        "NoCompleteTrial",
        "TrialsFailed",
    }
    assert all(hasattr(hpo, name) for name in hpo.__all__)


def test_the_public_calls_stay_functions_once_every_module_is_imported():
    # Importing a submodule sets it as an attribute of the package: a module named like a call (hpo/check.py
    # beside hpo.check) would replace the call for everyone once anything imported the module.
    import importlib
    import pkgutil

    import hpo
    from hpo import api

    for module in pkgutil.walk_packages(hpo.__path__, "hpo."):
        importlib.import_module(module.name)
    for name in hpo.__all__:
        if hasattr(api, name):
            assert getattr(hpo, name) is getattr(api, name), name
