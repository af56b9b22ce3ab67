"""hpo from Python: a notebook runs, validates, reports and exports a study given as a dict, with no YAML file."""

import logging
import warnings

import optuna
import pytest
import transformers
from conftest import study_dict
from rich.console import Console

import hpo


def _settings() -> tuple:
    """What a library call must leave as it found it: loggers, warning filters, verbosity, progress bars."""
    return (
        optuna.logging.get_verbosity(),
        transformers.logging.get_verbosity(),
        transformers.logging.is_progress_bar_enabled(),
        tuple(warnings.filters),
        logging.getLogger().level,
        tuple(logging.getLogger().handlers),
    )


def test_a_study_from_a_dict(tiny_model, tmp_path):
    study = study_dict(
        tiny_model, n_trials=2, storage=f"sqlite:///{tmp_path / 'nb.db'}", output_dir=str(tmp_path / "outputs")
    )
    before = _settings()
    cfg = hpo.validate(study)
    assert cfg.study == "tiny" and set(cfg.search_space) == {"learning_rate", "per_device_train_batch_size"}
    ran = hpo.run(study, n_trials=1, console=Console(quiet=True))
    assert isinstance(ran, optuna.Study) and len(ran.trials) == 1
    assert [f.name for f in tmp_path.iterdir() if f.suffix == ".yaml"] == []  # no file was needed
    hpo.run(study, console=Console(quiet=True))  # resumes: the study holds n_trials = 2
    trials, studies = hpo.report([study])
    assert len(trials) == 2 and trials["study"].eq("tiny").all() and studies.loc[0, "n_complete"] == 2
    args, rest = hpo.best(study)
    assert rest["trial"] == trials.sort_values("rank").iloc[0]["trial"] and rest["value"] == studies.loc[0, "best"]
    assert transformers.TrainingArguments(**args).per_device_train_batch_size in (4, 8)
    assert _settings() == before  # no process-wide setting changed


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
