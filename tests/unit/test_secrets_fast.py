"""A ``${...SECRET/TOKEN/KEY/PASSWORD}`` value masked in configs, fingerprints and errors, before any trial."""

import json

import pytest

from tests.conftest import DATA

SECRET = "tok-9f3c2e7a51"


def spellings(secret: str) -> list[bytes]:
    """The secret as written, as JSON escapes it (ASCII or not) and as repr does, in UTF-8."""
    texts = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1]}
    return [t.encode() for t in texts]


SECRET_PLACES = {  # where a ${...TOKEN} would become a name, a path, a URL or a saved value, and the key it names
    "search-space-choice": (
        {"search_space": {"lr_scheduler_type": {"type": "categorical", "choices": ["linear", "${MY_SECRET_TOKEN}"]}}},
        "search_space.lr_scheduler_type.choices[1]",
    ),
    "model": ({"model": "${MY_SECRET_TOKEN}"}, "model"),  # a hub id: in download URLs and the hub's warnings
    "model-folder": ({"model": "models/${MY_SECRET_TOKEN}"}, "model"),
    "model-config": (
        {"model": {"config": {"architecture": "bert", "name_or_path": "${MY_SECRET_TOKEN}"}, "tokenizer": "x"}},
        "model.config.name_or_path",
    ),
    "enqueue": (
        {
            "search_space": {"lr_scheduler_type": {"type": "categorical", "choices": ["linear", "constant"]}},
            "enqueue": [{"lr_scheduler_type": "${MY_SECRET_TOKEN}"}],
        },
        "enqueue[0].lr_scheduler_type",
    ),
    "output-dir": ({"output_dir": "runs/${MY_SECRET_TOKEN}"}, "output_dir"),
    "data-path": ({"data": {"train": "${MY_SECRET_TOKEN}/t.csv", "eval": str(DATA / "eval.csv")}}, "data.train"),
    "data-column": (
        {
            "data": {
                "train": str(DATA / "train.csv"),
                "eval": str(DATA / "eval.csv"),
                "text_column": "${MY_SECRET_TOKEN}",
            }
        },
        "data.text_column",
    ),
    "run-name": ({"train": {"num_train_epochs": 1, "run_name": "nightly-${MY_SECRET_TOKEN}"}}, "train.run_name"),
    "hub-model-id": ({"train": {"num_train_epochs": 1, "hub_model_id": "me/${MY_SECRET_TOKEN}"}}, "train.hub_model_id"),
    "sampler-argument": ({"sampler": {"name": "random", "seed": "${MY_SECRET_TOKEN}"}}, "sampler.seed"),
    "sqlite-file": ({"storage": "sqlite:///${MY_SECRET_TOKEN}.db"}, "storage"),
    "storage-host": ({"storage": "postgresql://hpo:pw@${MY_SECRET_TOKEN}/hpo"}, "storage"),
    "storage-database": ({"storage": "postgresql://hpo@db/${MY_SECRET_TOKEN}"}, "storage"),
    "environment": ({"environments": {"prod": {"model": "${MY_SECRET_TOKEN}"}}}, "environments.prod.model"),
}


@pytest.mark.parametrize("place", SECRET_PLACES)
def test_a_secret_goes_only_where_a_library_takes_a_credential(write_study, monkeypatch, place):
    # `model: ${HF_TOKEN}` put the token in huggingface_hub's warnings (online: in a URL); a token among a
    # searched parameter's choices was masked on the console only, and stored in clear in the database,
    # trials.csv and report.html. Only the storage URL's password and train.hub_token may hold a secret.
    from hpo import load_study
    from hpo.errors import ConfigError

    monkeypatch.setenv("MY_SECRET_TOKEN", SECRET)
    changes, key = SECRET_PLACES[place]
    path = write_study(**changes)
    with pytest.raises(ConfigError) as e:
        load_study(path)
    (problem,) = e.value.problems
    assert problem.key == key and "${MY_SECRET_TOKEN} is a secret" in problem.message, problem
    assert SECRET not in str(e.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"storage": "postgresql://hpo:${MY_SECRET_TOKEN}@db/hpo"},
        {"storage": "postgresql://hpo:pw-${MY_SECRET_TOKEN}@db/hpo?connect_timeout=5"},
        {"train": {"num_train_epochs": 1, "hub_token": "${MY_SECRET_TOKEN}"}},
    ],
    ids=["password", "part-of-a-password", "hub-token"],
)
def test_a_credential_may_hold_a_secret_and_is_masked(write_study, monkeypatch, changes):
    from hpo import load_study
    from hpo.study.storage import resolved_config

    monkeypatch.setenv("MY_SECRET_TOKEN", SECRET)
    cfg = load_study(write_study(**changes))
    assert SECRET not in repr(resolved_config(cfg)) and SECRET not in cfg.storage_label


def test_a_hub_token_written_in_clear_is_masked_too(write_study):
    # Not from ${VAR}: the study's saved config, its dashboard note and its fingerprint held it in clear.
    from hpo import load_study
    from hpo.study.revisions import fingerprint
    from hpo.study.storage import resolved_config

    for cfg in (
        load_study(write_study(train={"num_train_epochs": 1, "hub_token": SECRET})),
        load_study(write_study(), {"train.hub_token": SECRET}),
    ):
        assert resolved_config(cfg)["train"]["hub_token"] == "***" and fingerprint(cfg)["train"]["hub_token"] == "***"
        assert SECRET not in repr(resolved_config(cfg)) + repr(fingerprint(cfg))
