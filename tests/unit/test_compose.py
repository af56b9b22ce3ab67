"""Composition (extends, environments, overrides) and search-space power on real studies."""

import json
import re

import pytest
import yaml

from hpo import ConfigError, load_study
from tests.conftest import DATA, study_dict


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def line_of(path, text):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture
def base(tmp_path, tiny_model):
    """A base study in its own folder, with data paths relative to that folder."""
    (tmp_path / "shared" / "data").mkdir(parents=True)
    for name in ("train.csv", "eval.csv"):
        (tmp_path / "shared" / "data" / name).write_text((DATA / name).read_text())
    study = study_dict(tiny_model, data={"train": "data/train.csv", "eval": "data/eval.csv", "max_length": 16})
    return write(tmp_path / "shared" / "base.yaml", study)


def test_extends_deep_merges_and_keeps_each_files_paths_and_lines(tmp_path, base):
    child = write(
        tmp_path / "studies" / "child.yaml",
        {"extends": "../shared/base.yaml", "study": "child", "n_trials": 3, "train": {"num_train_epochs": 1}},
    )
    cfg = load_study(child)
    assert (cfg.study, cfg.n_trials) == ("child", 3)
    assert cfg.train == {"num_train_epochs": 1, "seed": 0, "warmup_ratio": 0.1}  # merged, child wins
    assert cfg.data.train == tmp_path / "shared" / "data" / "train.csv"  # relative to base.yaml
    assert cfg.storage_url.endswith("/studies/child.db")  # the run file's storage, not the base's
    # A model folder the base names beside itself is that folder, from wherever the child is run (it resolved
    # beside the child or in the current folder, and loaded whatever model had that name there).
    (tmp_path / "shared" / "tiny").mkdir()
    write(base, {**yaml.safe_load(base.read_text()), "model": "tiny"})
    assert load_study(child).model.name == str(tmp_path / "shared" / "tiny")
    write(base, {**yaml.safe_load(base.read_text()), "model": {"name": "tiny", "tokenizer": "tiny"}})
    assert load_study(child).model.tokenizer == str(tmp_path / "shared" / "tiny")

    child.write_text(child.read_text().replace("n_trials: 3", "n_trials: -3"))
    base.write_text(base.read_text().replace("max_length: 16", "max_length: 0"))
    with pytest.raises(ConfigError) as e:
        load_study(child)
    found = sorted(map(str, e.value.problems))
    assert found == sorted(
        [
            f"{base}:{line_of(base, 'max_length')}: data.max_length: Input should be greater than 0",
            f"{child}:{line_of(child, 'n_trials')}: n_trials: Input should be greater than 0",
        ]
    )


def test_extends_cycle_and_missing_base(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, {"extends": "b.yaml"})
    write(b, {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match=re.escape("extend each other in a cycle: a.yaml → b.yaml → a.yaml")):
        load_study(a)
    write(a, {"extends": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"a.yaml:1: extends: file not found: .*nope.yaml"):
        load_study(a)


def test_environments_overlay_the_study(write_study, tmp_path):
    path = write_study(
        environments={
            "dev": {"n_trials": 1, "train": {"num_train_epochs": 1}},
            "prod": {"storage": "postgresql://hpo:${DB_PASSWORD}@db.internal/hpo"},
        }
    )
    assert load_study(path).n_trials == 2  # no --env: the file as written; prod's unset variable waits for prod
    dev = load_study(path, env="dev")
    assert (dev.n_trials, dev.train["num_train_epochs"], dev.train["seed"], dev.environment) == (1, 1, 0, "dev")
    with pytest.raises(ConfigError) as e:
        load_study(path, env="stage")
    assert (
        str(e.value)
        == f"{path}:{line_of(path, 'environments:')}: environments: no environment 'stage' (defined: dev, prod)"
    )
    with pytest.raises(ConfigError) as e:  # an error inside an environment points at the environment's line
        load_study(path, env="prod")
    assert (
        str(e.value)
        == f"{path}:{line_of(path, 'DB_PASSWORD')}: storage: ${{DB_PASSWORD}} is not set in the environment or .env"
    )
    path.write_text(path.read_text().replace("n_trials: 1", "n_trials: many"))
    with pytest.raises(ConfigError) as e:  # environments not chosen are checked too
        load_study(path, env="prod")
    assert str(e.value).splitlines() == [  # every problem at once
        f"{path}:{line_of(path, 'DB_PASSWORD')}: storage: ${{DB_PASSWORD}} is not set in the environment or .env",
        f"{path}:{line_of(path, 'many')}: environments.dev.n_trials: Input should be a valid integer, unable to parse string as an integer",
    ]


def test_environment_storage_password_is_masked(write_study, tmp_path, monkeypatch):
    from hpo.study.storage import resolved_config

    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    path = write_study(environments={"prod": {"storage": "postgresql://hpo:${DB_PASSWORD}@db.internal/hpo"}})
    resolved = resolved_config(load_study(path, env="prod"))
    assert "s3cret" not in json.dumps(resolved)
    assert resolved["storage"] == "postgresql+psycopg://hpo:***@db.internal/hpo"  # psycopg 3 for a plain URL
    assert resolved["environment"] == "prod" and "environments" not in resolved


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"constraints": ["per_device_train_batch_size * grad_acc <= 8"]}, "constraints[0]: unknown name 'grad_acc'"),
        ({"constraints": ["open('x')"]}, "is not allowed"),
        ({"search_space": {"lora_alpha": {"derive": "2 * r"}}}, "search_space.lora_alpha.derive: unknown name 'r'"),
        (
            {"search_space": {"adam_beta2": {"type": "float", "low": 0.9, "high": 0.99, "when": {"optim": "sgd"}}}},
            "search_space.adam_beta2.when.optim: 'optim' must be a parameter defined above 'adam_beta2'",
        ),
        (
            {
                "search_space": {
                    "optim": {"type": "categorical", "choices": ["sgd"]},
                    "adam_beta2": {"type": "float", "low": 0.9, "high": 0.99, "when": {"optim": "adam"}},
                }
            },
            "search_space.adam_beta2.when.optim: 'adam' is not one of optim's choices ['sgd']",
        ),
    ],
)
def test_search_space_power_errors(write_study, changes, expected):
    with pytest.raises(ConfigError) as e:
        load_study(write_study(**changes))
    assert any(expected in str(p) for p in e.value.problems), e.value


def test_secret_variables_are_masked_in_the_resolved_config(write_study, monkeypatch):
    from hpo.study.storage import resolved_config

    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123")
    monkeypatch.setenv("RUN_NAME", "nightly")
    path = write_study(train={"num_train_epochs": 1, "hub_token": "${HF_TOKEN}", "run_name": "${RUN_NAME}"})
    resolved = resolved_config(load_study(path))
    assert resolved["train"]["hub_token"] == "***" and resolved["train"]["run_name"] == "nightly"


def test_data_slices_for_quick_environments(write_study):
    from hpo.trial.workbench import prepare

    path = write_study(environments={"dev": {"data": {"max_train_rows": 9, "max_eval_rows": 3}}})
    dev = prepare(load_study(path, env="dev"))
    assert (len(dev.train_rows), len(dev.eval_rows)) == (9, 3)
    full = prepare(load_study(path))
    assert (len(full.train_rows), len(full.eval_rows)) == (36, 6)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {
                "search_space": {
                    "r": {"type": "categorical", "choices": [4, 8]},
                    "lora_alpha": {"derive": "32 / (r - 4)"},
                }
            },
            "search_space.lora_alpha.derive: '32 / (r - 4)': division by zero at r=4",
        ),
        (
            {
                "search_space": {
                    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2},
                    "lora_dropout": {"derive": "learning_rate * 1000"},
                }
            },
            "search_space.lora_dropout.derive: gives 10.0 at learning_rate=0.01; lora_dropout must be a probability",
        ),
        (
            {
                "search_space": {"per_device_train_batch_size": {"type": "int", "low": 0, "high": 8}},
                "constraints": ["64 // per_device_train_batch_size <= 8"],
            },
            "constraints[0]: '64 // per_device_train_batch_size <= 8': integer division or modulo by zero",
        ),
    ],
)
def test_derive_and_constraints_are_evaluated_at_the_corners(write_study, changes, expected):
    with pytest.raises(ConfigError) as e:
        load_study(write_study(**changes))
    assert any(expected in str(p) for p in e.value.problems), e.value
