"""A changed study file never silently joins the old study: the changes named, before any trial."""


def test_changes_name_each_leaf():
    from hpo.study.revisions import changes

    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    new = {"a": {"b": 2, "c": [1, 2]}, "e": 1}
    assert changes(old, new) == ["a.b: 1 → 2", "d: removed", "e: added"]
    assert changes(old, old) == []


def test_what_a_value_means_is_keyed_as_older_studies_stored_it(tiny_model):
    # A study saved before objective.at and objectives existed stored {metric, direction}: a default study file
    # must key the same, or every existing study is refused ("ranks its trials by eval_loss (minimize); this file
    # asks for eval_loss (minimize)" — seen when the key was the whole model, `at` included).
    from conftest import study_dict

    from hpo.api import load
    from hpo.study.revisions import objective_key

    assert objective_key(load(study_dict(tiny_model))) == {"metric": "eval_loss", "direction": "minimize"}
    best = objective_key(load(study_dict(tiny_model, objective={"at": "best"})))
    assert best == {"metric": "eval_loss", "direction": "minimize", "at": "best"}  # another meaning: refused
    two = [{"metric": "eval_loss"}, {"metric": "train_seconds"}]
    assert objective_key(load(study_dict(tiny_model, objectives=two)))["objectives"] == [
        "eval_loss (minimize)",
        "train_seconds (minimize)",
    ]


def test_settings_that_change_what_a_value_means_are_in_the_fingerprint(tiny_model):
    from conftest import study_dict

    from hpo.api import load
    from hpo.study.revisions import fingerprint

    plain = fingerprint(load(study_dict(tiny_model)))
    assert not {"repeats", "early_stopping", "processes_per_trial"} & set(plain)  # older studies keep theirs
    for changes in (
        {"repeats": 3},
        {"early_stopping": {"patience": 2}, "objective": {"at": "best"}},
        {"resources": {"processes_per_trial": 2}},
    ):
        assert fingerprint(load(study_dict(tiny_model, **changes))) != plain, changes
