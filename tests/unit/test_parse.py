"""Reading study files, no study built: YAML text → data and a source map of lines; extends: layers deep-merged.

tests/test_config.py and tests/test_compose.py check the lines that whole errors show; this file the pieces.
"""

import pytest

from hpo.config import _deep_merge, parse_yaml
from hpo.errors import ConfigError, SourceMap

STUDY = """\
# tune the tiny model
study: tiny
train:
  learning_rate: 0.1
  target_modules:
    - query
    - value
search_space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2}
  bs:
    type: categorical
    choices: [4, 8]
"""


def test_yaml_data_comes_back_as_plain_values():
    data, _ = parse_yaml(STUDY, "s.yaml")
    assert data == {
        "study": "tiny",
        "train": {"learning_rate": 0.1, "target_modules": ["query", "value"]},
        "search_space": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2},
            "bs": {"type": "categorical", "choices": [4, 8]},
        },
    }


@pytest.mark.parametrize(
    "path, line",
    [
        ((), 2),  # the document starts at its first key, after the comment
        (("study",), 2),
        (("train",), 3),  # a key whose value is a block below: the key's own line
        (("train", "learning_rate"), 4),
        (("train", "target_modules"), 5),
        (("train", "target_modules", 0), 6),  # list items at their own lines
        (("train", "target_modules", 1), 7),
        (("search_space", "lr", "high"), 9),  # a flow mapping: every key on its one line
        (("search_space", "bs", "choices", 1), 12),
        (("search_space", "bs", "log"), 10),  # no such key: its closest ancestor's line
        (("data", "train"), 2),  # nothing of it: the document's line
    ],
)
def test_every_key_path_maps_to_its_line(path, line):
    _, source = parse_yaml(STUDY, "s.yaml")
    assert source.locate(path) == ("s.yaml", line)


def test_problems_read_file_line_and_key_path():
    _, source = parse_yaml(STUDY, "studies/s.yaml")
    problem = source.problem(("train", "target_modules", 1), "not a module of the model")
    assert str(problem) == "studies/s.yaml:7: train.target_modules[1]: not a module of the model"
    assert (
        str(source.error(("search_space", "lr", "low"), "low=0.1 > high=0.01"))
        == "studies/s.yaml:9: search_space.lr.low: low=0.1 > high=0.01"
    )


def test_an_alias_points_at_its_anchor_and_its_key_at_the_key():
    text = "x-float: &float\n  type: float\n  low: 0.5\nsearch_space:\n  lr: *float\n"
    data, source = parse_yaml(text, "s.yaml")
    assert data["search_space"]["lr"] == {"type": "float", "low": 0.5}
    assert source.locate(("search_space", "lr")) == ("s.yaml", 5)  # the key that used the alias
    assert source.locate(("search_space", "lr", "low")) == ("s.yaml", 3)  # the value to fix is at the anchor


def test_an_empty_file_is_none_with_no_lines():
    data, source = parse_yaml("# nothing yet\n", "empty.yaml")
    assert data is None and source.locate(("study",)) == ("empty.yaml", None)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("study: a\nn_trials: 2\nstudy: b\n", 3, "s.yaml:3: study: duplicate key (first on line 1); keep one"),
        ("a: &x [*x]\n", 1, "recursive alias"),
        ("a: " + "[" * 70 + "]" * 70 + "\n", 1, "nested deeper than 64 levels"),
        ("a: [1, 2\nb: 3\n", 2, "YAML syntax error"),
        ("a: !!python/object:os.system x\n", 1, "YAML syntax error: could not determine a constructor"),
    ],
)
def test_what_yaml_would_hide_or_hang_on_is_one_problem_at_its_line(text, line, message):
    with pytest.raises(ConfigError) as e:
        parse_yaml(text, "s.yaml")
    (problem,) = e.value.problems
    assert problem.line == line and message in str(problem)


def test_an_alias_bomb_is_refused_before_it_is_expanded():
    text = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n"  # 9**n values from n short lines
    for i in range(1, 8):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    with pytest.raises(ConfigError, match="over 100,000 values once aliases are expanded"):
        parse_yaml(text, "s.yaml")
    data, _ = parse_yaml(text.rsplit("l5:", 1)[0], "s.yaml")  # 9**5 = 59,049 strings: big, allowed
    assert len(data["l4"]) == 9 and data["l4"][0][0][0][0] == ["x"] * 9


def test_merge_key_and_explicit_keys_are_not_duplicates():
    data, _ = parse_yaml("base: &b {type: float, low: 1}\nlr:\n  <<: *b\n  low: 2\n", "s.yaml")
    assert data["lr"] == {"type": "float", "low": 2}  # the explicit key wins over the merged one


def test_deep_merge_merges_mappings_and_replaces_everything_else():
    base = {
        "study": "base",
        "train": {"num_train_epochs": 3, "seed": 0, "optim": {"name": "adamw", "eps": 1e-8}},
        "data": {"train": "a.csv", "max_length": 128},
        "search_space": {"lr": {"low": 1e-5, "high": 1e-3}},
        "target_modules": ["query", "value"],
        "pruner": {"name": "median"},
    }
    over = {
        "study": "child",
        "train": {"num_train_epochs": 1, "optim": {"eps": 1e-6}},
        "target_modules": ["key"],
        "pruner": "none",
        "data": {"max_length": None},
        "n_trials": 5,
    }
    assert _deep_merge(base, over) == {
        "study": "child",
        "train": {"num_train_epochs": 1, "seed": 0, "optim": {"name": "adamw", "eps": 1e-6}},  # nested, key by key
        "data": {"train": "a.csv", "max_length": None},  # null replaces: it is a value
        "search_space": {"lr": {"low": 1e-5, "high": 1e-3}},  # untouched
        "target_modules": ["key"],  # lists replace, never concatenate
        "pruner": "none",  # a scalar replaces a mapping
        "n_trials": 5,  # new keys are added
    }
    assert _deep_merge({"pruner": "none"}, {"pruner": {"name": "median"}}) == {"pruner": {"name": "median"}}


def test_deep_merge_leaves_its_inputs_alone_and_keeps_the_base_order():
    base, over = {"a": {"x": 1}, "b": 2}, {"c": 3, "a": {"y": 2}}
    merged = _deep_merge(base, over)
    assert list(merged) == ["a", "b", "c"] and merged["a"] == {"x": 1, "y": 2}
    assert base == {"a": {"x": 1}, "b": 2} and over == {"c": 3, "a": {"y": 2}}


def test_a_layers_source_map_wins_where_it_writes_and_the_base_elsewhere():
    # extends: the base file's map, updated with the extending file's: each line from the file that set the value
    _, base = parse_yaml("study: base\ntrain:\n  seed: 0\n  num_train_epochs: 3\n", "base.yaml")
    _, child = parse_yaml("extends: base.yaml\ntrain:\n  num_train_epochs: 1\n", "child.yaml")
    merged = base.copy()
    merged.update(child)
    assert merged.locate(("train", "num_train_epochs")) == ("child.yaml", 3)
    assert merged.locate(("train", "seed")) == ("base.yaml", 3)
    assert merged.locate(("study",)) == ("base.yaml", 1)
    assert base.locate(("train", "num_train_epochs")) == ("base.yaml", 4)  # copy: the base map is unchanged


def test_a_sub_map_takes_its_prefix_off():
    _, source = parse_yaml(STUDY, "s.yaml")
    space = source.subtree(("search_space",))
    assert space.locate(("bs", "choices")) == ("s.yaml", 12)
    assert sorted(p for p in source.paths_under(("train", "target_modules")) if p[2:]) == [
        ("train", "target_modules", 0),
        ("train", "target_modules", 1),
    ]
    assert SourceMap().locate(("x",)) == ("<study>", None)
