import re

import pytest
import yaml

from hpo import ConfigError, load_study
from tests.conftest import DATA, study_dict


def errors(path, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_study(path, overrides)
    return [str(p) for p in e.value.problems]


def test_valid_study_loads_with_defaults(write_study):
    cfg = load_study(write_study())
    assert cfg.study == "tiny" and cfg.n_trials == 2
    assert cfg.objective.metric == "eval_loss" and cfg.objective.direction == "minimize"
    assert cfg.storage_url.startswith("sqlite:///") and cfg.storage_url.endswith("/study.db")
    assert cfg.output_path == cfg.root / "outputs" / "tiny"
    assert not cfg.is_lora


def test_direction_follows_the_metric(write_study):
    assert load_study(write_study(objective={"metric": "eval_f1_macro"})).objective.direction == "maximize"
    # Perplexity is a loss in all but name: it was maximized, so hpo called the worst model the best.
    causal = write_study(
        task="causal-lm",
        objective={"metric": "eval_perplexity"},
        data={
            "train": str(DATA / "chat_train.jsonl"),
            "eval": str(DATA / "chat_eval.jsonl"),
            "prompt_column": "prompt",
            "response_column": "response",
        },
    )
    assert load_study(causal).objective.direction == "minimize"


def test_relative_paths_resolve_against_the_study_file(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "eval.csv"):
        (data / name).write_text(_data(name))
    study = study_dict(tiny_model, data={"train": "data/train.csv", "eval": "data/eval.csv"})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    assert load_study(path).data.train == data / "train.csv"


def _data(name):
    from tests.conftest import DATA

    return (DATA / name).read_text()


def test_errors_name_file_line_and_key(write_study):
    path = write_study()
    text = path.read_text().replace("learning_rate:", "lerning_rate:").replace("n_trials: 2", "n_trails: 2")
    path.write_text(text)
    lines = text.splitlines()
    found = errors(path)
    assert len(found) == 2  # every problem at once
    lr_line = next(i for i, line in enumerate(lines, 1) if "lerning_rate" in line)
    assert (
        f"{path}:{lr_line}: search_space.lerning_rate: unknown parameter 'lerning_rate'; did you mean 'learning_rate'?"
        in found
    )
    n_line = next(i for i, line in enumerate(lines, 1) if "n_trails" in line)
    assert f"{path}:{n_line}: n_trails: unknown key; did you mean 'n_trials'?" in found


def test_nested_unknown_key_suggests(write_study):
    from tests.conftest import DATA

    (found,) = errors(
        write_study(data={"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "text_colum": "text"})
    )
    assert "data.text_colum: unknown key; did you mean 'text_column'?" in found


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {"search_space": {"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}},
            "search_space.learning_rate: low=0.1 > high=0.01",
        ),
        (
            {"search_space": {"output_dir": {"type": "categorical", "choices": ["a"]}}},
            "search_space.output_dir: 'output_dir' is set by hpo",
        ),
        (
            {"train": {"num_train_epoch": 2}},
            "train.num_train_epoch: not a TrainingArguments field: 'num_train_epoch'; did you mean 'num_train_epochs'?",
        ),
        ({"sampler": {"name": "tpee"}}, "sampler.name: Input should be 'tpe'"),
        (
            {"pruner": {"name": "median", "n_startup_trails": 3}},
            "pruner.n_startup_trails: MedianPruner: got an unexpected keyword argument 'n_startup_trails'; did you mean "
            "'n_startup_trials'?",
        ),
        ({"n_trials": 0}, "n_trials: Input should be greater than 0"),
        ({"eval_every": {"epochs": 0.5, "examples": 10}}, "eval_every: give a number of epochs"),
        ({"eval_every": {"epochs": 0.5, "subsample": 0}}, "eval_every.subsample: Input should be greater than 0"),
        ({"eval_every": {"epochs": 0.5, "subsample": 1.5}}, "eval_every.subsample: Input should be less than or equal"),
        (
            {"pruner": {"name": "median", "min_optimizer_steps": -1}},
            "pruner.min_optimizer_steps: Input should be greater than or equal to 0",
        ),
        (
            {"objective": {"metric": "eval_bleu"}},
            "objective.metric: 'eval_bleu' is not reported by sequence-classification",
        ),
        ({"data": {"train": "missing.csv", "eval": "missing.csv"}}, "data.train: file not found"),
        ({"search_space": {"train_batch": {"type": "int", "low": 1, "high": 2}}}, "unknown parameter 'train_batch'"),
        (
            {"sampler": {"name": "grid"}},
            "grid sampler needs categorical or stepped parameters; 'learning_rate' is continuous",
        ),
    ],
)
def test_bad_values_are_reported_at_their_key(write_study, changes, expected):
    found = errors(write_study(**changes))
    assert any(expected in line for line in found), found


def test_missing_required_key(write_study):
    path = write_study()
    data = yaml.safe_load(path.read_text())
    del data["model"]
    path.write_text(yaml.safe_dump(data))
    assert f"{path}:1: model: required key is missing" in errors(path)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study: x\nsearch_space:\n  lr: {type: float, low: 1\n")
    (found,) = errors(path)
    assert found.startswith(f"{path}:4: YAML syntax error")


def test_missing_file(tmp_path):
    (found,) = errors(tmp_path / "nope.yaml")
    assert "nope.yaml: cannot read" in found


def test_overrides_win_and_are_validated(write_study):
    path = write_study()
    cfg = load_study(path, {"n_trials": 5, "train.num_train_epochs": 1})
    assert cfg.n_trials == 5 and cfg.train["num_train_epochs"] == 1
    assert errors(path, {"n_trials": -1}) == ["<command line>: n_trials: Input should be greater than 0"]


def test_search_space_file(write_study, tmp_path):
    spaces = tmp_path / "spaces.yaml"
    spaces.write_text(
        "search_space:\n  learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
        "  warmup_ratio: {type: float, low: 0.5, high: 0.1}\n"
    )
    found = errors(write_study(search_space="spaces.yaml"))
    assert found == [f"{spaces}:3: search_space.warmup_ratio: low=0.5 > high=0.1"]


def test_lora_section_or_lora_names_make_a_lora_study(write_study, tiny_model):
    assert load_study(write_study(model={"name": str(tiny_model), "lora": {"r": 4}})).is_lora
    space = {"r": {"type": "categorical", "choices": [4, 8]}}
    assert load_study(write_study(search_space=space)).is_lora


def test_data_checks_run_before_training(write_study, tmp_path):
    from hpo.trial.workbench import prepare

    bad = tmp_path / "eval.csv"
    bad.write_text("text,label\nhello,greeting\nwhat,unseen_label\n")
    path = write_study(data={"train": str(tmp_path.parent / "x.csv"), "eval": str(bad)})
    assert any("file not found" in line for line in errors(path))
    from tests.conftest import DATA

    cfg = load_study(write_study(data={"train": str(DATA / "train.csv"), "eval": str(bad)}))
    with pytest.raises(ConfigError, match=re.escape("data.eval: eval labels not in train: 'unseen_label'")):
        prepare(cfg)
    cfg = load_study(
        write_study(data={"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "text_column": "sentence"})
    )
    with pytest.raises(ConfigError, match=re.escape("data.text_column: column 'sentence' not in train.csv")):
        prepare(cfg)


def test_jsonl_data(write_study, tmp_path):
    import json

    from hpo.data import load_examples

    rows = [{"text": f"hello {i}", "label": i % 2} for i in range(4)]
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_examples(load_study(write_study(data={"train": "train.jsonl", "eval": "eval.jsonl"})))
    assert data.labels == ["0", "1"] and [label for _, label in data.train] == [0, 1, 0, 1]


def test_enqueue_is_checked_against_the_space(write_study):
    found = errors(write_study(enqueue=[{"learning_rate": 1.0}, {"lerning_rate": 1e-3}]))
    assert any("enqueue[0].learning_rate: 1.0 is outside the search space" in f for f in found), found
    assert any("enqueue[1].lerning_rate: not in search_space; did you mean 'learning_rate'?" in f for f in found), found


def test_variables_from_the_environment_and_dotenv(write_study, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("STUDY_NAME=from-dotenv\nTRIALS=4\n")
    path = write_study(study="${STUDY_NAME}", n_trials="${TRIALS}", storage="sqlite:///${DB_DIR}/x.db")
    monkeypatch.setenv("DB_DIR", "/data")
    monkeypatch.setenv("TRIALS", "5")  # the environment wins over .env
    cfg = load_study(path)
    assert (cfg.study, cfg.n_trials, cfg.storage) == ("from-dotenv", 5, "sqlite:////data/x.db")
    monkeypatch.delenv("DB_DIR")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("storage:"))
    assert errors(path) == [f"{path}:{line}: storage: ${{DB_DIR}} is not set in the environment or .env"]


def test_ordinary_anchors_aliases_and_merge_keys_work_and_point_at_their_lines(write_study):
    path = write_study()
    head = path.read_text().split("search_space:")[0]
    path.write_text(
        head
        + """x-float: &float {type: float, log: true}
x-bad: &bad {type: float, low: 0.5, high: 0.1}
x-typo: &typo {type: float, low: 0.1, high: 0.5, lgo: true}
search_space:
  learning_rate:
    <<: *float
    low: 1.0e-4
    high: 1.0e-2
  weight_decay: *bad
  adam_beta2: *typo
"""
    )
    lines = path.read_text().splitlines()
    at = {name: next(i for i, line in enumerate(lines, 1) if name in line) for name in ("weight_decay", "&typo")}
    found = [p for p in errors(path) if not p.split(": ")[1].startswith("x-")]  # x- keys are unknown: expected
    assert found == [  # the merge key is no duplicate; each error at the line to fix
        f"{path}:{at['weight_decay']}: search_space.weight_decay: low=0.5 > high=0.1",
        f"{path}:{at['&typo']}: search_space.adam_beta2.lgo: unknown key; did you mean 'low'?",
    ]


def test_a_relative_sqlite_path_is_relative_to_the_study_file(write_study, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_study(write_study(storage="sqlite:///runs/x.db?timeout=30"))
    assert cfg.storage_url == f"sqlite:///{tmp_path / 'runs' / 'x.db'}?timeout=30"
    assert load_study(write_study(storage="sqlite:////abs/x.db")).storage_url == "sqlite:////abs/x.db"
    # One file spelt two ways was two storages to the output folder's owner check.
    assert load_study(write_study(storage="sqlite:////abs//y/../x.db")).storage_url == "sqlite:////abs/x.db"


@pytest.mark.parametrize("folder", ["runs?v=2", "runs#2", "100%", "a%41", "x?"])
def test_the_default_storage_beside_a_study_file_is_that_file_whatever_its_folder(tiny_model, tmp_path, folder):
    # The default SQLite URL was the path as it is: SQLAlchemy cut it at '?' (a storage in another folder) and
    # decoded '%41' as 'A'. The path is escaped in the URL, and read back as it is.
    from sqlalchemy.engine import make_url

    path = tmp_path / folder / "study.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(study_dict(tiny_model)))
    assert make_url(load_study(path).storage_url).database == str(path.parent / "study.db")
    relative = path.with_name("relative.yaml")  # a relative storage: made absolute against the same folder
    relative.write_text(yaml.safe_dump(study_dict(tiny_model, storage="sqlite:///s.db")))
    assert make_url(load_study(relative).storage_url).database == str(path.parent / "s.db")


def test_a_relative_storage_flag_is_relative_to_where_the_command_runs(write_study, tmp_path, monkeypatch):
    from hpo.cli import _storage

    path = write_study()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _storage("sqlite:///x.db") == {"storage": f"sqlite:///{elsewhere / 'x.db'}"}
    assert _storage("postgresql://u@h/db") == {"storage": "postgresql://u@h/db"}
    # So is a storage=... override: left relative, two folders' x.db shared one output folder and its best_model/.
    assert load_study(path, {"storage": "sqlite:///x.db"}).storage_url == f"sqlite:///{elsewhere / 'x.db'}"


def test_an_override_adds_to_a_model_given_by_name(write_study, tiny_model):
    # model: NAME is short for {name: NAME}: model.lora.r=4 used to replace it with {lora: {r: 4}}.
    cfg = load_study(write_study(), {"model.lora.r": 4})
    assert cfg.model.name == str(tiny_model) and cfg.model.lora.r == 4


def test_overlays_add_to_every_shorthand(write_study, tmp_path):
    # eval_every: 0.25 is short for {epochs: 0.25}: eval_every.subsample=1 replaced it with {subsample: 1}, and the
    # study was refused ("give a number of epochs"); an environment or an extending file did the same.
    cfg = load_study(write_study(eval_every=0.5), {"eval_every.subsample": 1})
    assert (cfg.eval_every.epochs, cfg.eval_every.subsample) == (0.5, 1)
    cfg = load_study(write_study(eval_every=0.5, checkpoint_every=1), {"checkpoint_every.examples": 64})
    assert (cfg.checkpoint_every.examples, cfg.checkpoint_every.epochs) == (64, None)  # one of the two, replaced
    cfg = load_study(write_study(eval_every=0.5), {"eval_every.examples": 32})  # the other one of the two
    assert (cfg.eval_every.examples, cfg.eval_every.epochs, cfg.eval_every.subsample) == (32, None, 0.25)

    env = write_study(
        eval_every=0.5, environments={"dev": {"eval_every": {"subsample": 1}, "model": {"lora": {"r": 2}}}}
    )
    cfg = load_study(env, env="dev")
    assert (cfg.eval_every.epochs, cfg.eval_every.subsample, cfg.model.lora.r) == (0.5, 1, 2)
    assert cfg.model.name  # model: NAME kept under the environment's model: {...}

    base = write_study("base.yaml", eval_every=0.5)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\neval_every: {subsample: 1}\n")
    cfg = load_study(tmp_path / "child.yaml")
    assert (cfg.eval_every.epochs, cfg.eval_every.subsample) == (0.5, 1)
    assert base.exists()


def test_a_bad_sampler_argument_is_reported_where_it_was_set(write_study):
    # It was reported at the study file's sampler: line, though the command line set it.
    path = write_study(sampler={"name": "tpe", "seed": 0})
    with pytest.raises(ConfigError) as e:
        load_study(path, {"sampler.seed": -1})
    assert [str(p) for p in e.value.problems] == ["<command line>: sampler.seed: Seed must be between 0 and 2**32 - 1"]


@pytest.mark.parametrize(
    "name",
    [
        "exp\u202e1",  # right-to-left override: "exp\u202e1gpj.exe" prints as "exp1exe.jpg"
        "exp\u200b1",  # zero-width space: prints exactly as "exp1"
        "exp\u2066a\u2069",  # a bidi isolate
        "exp\ufeff",  # a byte-order mark
        "exp\u00a01",  # no-break space: prints as "exp 1"
        "exp\u30001",  # ideographic space
        "exp\u2028x",  # line separator
        "exp\u0085x",  # next line, a C1 control
        "exp\ue000",  # private use
        "cafe\u0301",  # not NFC: prints as "café", another name
    ],
)
def test_a_name_that_prints_like_another_is_refused(write_study, name):
    # Unicode format characters in a study name were accepted: one study printed exactly like another.
    for changes, key in (
        ({"study": name}, "study"),
        ({"environments": {name: {"n_trials": 3}}}, f"environments.{name}"),
    ):
        found = errors(write_study(**changes))
        from hpo.errors import visible  # how an error line shows a hidden character: escaped

        assert len(found) == 1, found  # an environment's name is checked by every environment's build: once
        assert f": {visible(key)}: " in found[0] and "name" in found[0], found
        assert found[0].isprintable() or name == "cafe\u0301", found  # escaped in the line
    with pytest.raises(ConfigError):
        load_study(study_dict(DATA, study=name))  # hpo.run's dicts too


def test_ordinary_unicode_names_are_kept(write_study):
    for name in ("café", "实验-1", "exp 1", "Ωmega_2"):
        assert load_study(write_study(study=name, environments={name: {"n_trials": 3}}), env=name).study == name
