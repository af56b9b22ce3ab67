"""Every study and search-space file we ship loads and validates (model and data included)."""

import copy
import json
from pathlib import Path

import optuna
import pytest
import yaml

from hpo import load_study
from hpo.trial.workbench import prepare

ROOT = Path(__file__).parents[2]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))  # not outputs/
SPACES = sorted((ROOT / "search_spaces").rglob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_study_validates(path):
    first, second = path.read_text().splitlines()[:2]
    assert first == "# yaml-language-server: $schema=../schemas/study.schema.json"
    assert second.startswith(f"# {path.relative_to(ROOT)} — run: hpo run {path.relative_to(ROOT)}")
    bench = prepare(load_study(path))
    assert len(bench.train_rows) >= 2


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_study_runs(path, tmp_path):
    """Each shipped study, shrunk to 2 one-epoch trials on 32 rows, runs end to end (full runs: README)."""
    from rich.console import Console

    from hpo.study.loop import run_study

    small = {
        "n_trials": 2,
        "train.num_train_epochs": 1,
        "data.max_train_rows": 32,
        "data.max_eval_rows": 32,
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "output_dir": str(tmp_path / "outputs"),
    }
    study = run_study(load_study(path, small), Console(quiet=True))
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 2
    assert optuna.trial.TrialState.COMPLETE in {t.state for t in study.trials}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_search_space_loads(path, write_study):
    assert "search_space" in yaml.safe_load(path.read_text())
    load_study(write_study(search_space=str(path), train={"num_train_epochs": 1}))


def test_quickstart_data_is_big_enough():
    cfg = load_study(ROOT / "studies" / "quickstart.yaml")
    bench = prepare(cfg)
    assert len(bench.train_rows) + len(bench.eval_rows) >= 400 and len(bench.labels) >= 4
    assert cfg.n_trials >= 8


def _validator(name):
    import jsonschema

    schema = json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def test_shipped_schemas_are_current(tmp_path):
    from hpo.config.schema import write_schemas

    for path in write_schemas(tmp_path):
        assert path.read_text() == (ROOT / "schemas" / path.name).read_text(), f"run: hpo schema ({path.name})"


@pytest.mark.parametrize("path", STUDIES + SPACES, ids=lambda p: str(p.relative_to(ROOT)))
def test_schema_accepts_shipped_files_and_rejects_mutations(path):
    validator = _validator("study" if path in STUDIES else "search_space")
    data = yaml.safe_load(path.read_text())
    validator.validate(data)
    mutations = [lambda d: d.update(n_trails=3), lambda d: d.update(search_space=42)]
    if isinstance(data["search_space"], dict):  # else a path to a search-space file, checked on its own
        name = next(iter(data["search_space"]))
        mutations += [
            lambda d: d["search_space"].update(lerning_rate={"type": "float", "low": 0, "high": 1}),
            lambda d: d["search_space"][name].update(type="floaty"),
        ]
    for mutate in mutations:
        broken = copy.deepcopy(data)
        mutate(broken)
        assert list(validator.iter_errors(broken)), f"schema accepted a mutated {path.name}"


def test_quickstart_environments(monkeypatch):
    dev = load_study(ROOT / "studies" / "quickstart.yaml", env="dev")
    assert (dev.study, dev.n_trials, dev.data.max_train_rows) == ("quickstart-dev", 3, 96)
    monkeypatch.setenv("HPO_DB_PASSWORD", "pw")
    prod = load_study(ROOT / "studies" / "quickstart.yaml", env="prod")
    assert prod.storage == "postgresql+psycopg://hpo:pw@localhost:5432/hpo" and prod.masked(prod.storage).endswith(
        ":***@localhost:5432/hpo"
    )
