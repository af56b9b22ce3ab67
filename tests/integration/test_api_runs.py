"""hpo from Python: a notebook runs, validates, reports and exports a study given as a dict, with no YAML file."""

import json
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


def test_a_loaded_study_keeps_its_folder_and_bad_arguments_say_so(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s.yaml").write_text(json.dumps(study_dict(tiny_model)))
    monkeypatch.chdir(tmp_path)
    cfg = hpo.load_study("a/s.yaml")
    monkeypatch.chdir(tmp_path / "a")
    # A relative study path once followed os.chdir: the storage and outputs moved with the current folder.
    assert cfg.storage_url == f"sqlite:///{tmp_path / 'a' / 's.db'}" and cfg.output_path == tmp_path / "a/outputs/tiny"
    with pytest.raises(ValueError, match="workers=0"):
        hpo.run(cfg, workers=0)
    with pytest.raises(TypeError, match="n_trials: a loaded StudyConfig is used as it is"):
        hpo.run(cfg, n_trials=2)
    with pytest.raises(hpo.ConfigError, match="<arguments>: n_trials: Input should be greater than 0"):
        hpo.validate("s.yaml", {"n_trials": 0})
    assert hpo.api.load("s.yaml", {"storage": "sqlite:///x.db"}).storage_url == f"sqlite:///{tmp_path / 'a/x.db'}"
    with pytest.raises(hpo.ConfigError, match="<dict>: not a study's value: bytes"):
        hpo.validate(study_dict(tiny_model, study=b"tiny"))
