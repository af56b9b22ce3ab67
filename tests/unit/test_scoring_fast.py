"""What a trial's value means: the settings refused or derived before any trial."""

import pytest
from conftest import study_dict

import hpo
from hpo.errors import ConfigError


def test_early_stopping_needs_the_best_evaluation_as_the_value(tiny_model):
    with pytest.raises(ConfigError, match=r"early_stopping: needs objective\.at: best"):
        hpo.validate(study_dict(tiny_model, early_stopping={"patience": 2}))


def test_repeats_refuses_what_it_cannot_average_yet(tiny_model):
    two = [{"metric": "eval_loss"}, {"metric": "train_seconds"}]
    for changes, message in [
        ({"objectives": two}, "repeats: repeats with several objectives"),
        (
            {"resources": {"processes_per_trial": 2}},
            "repeats: repeats with processes_per_trial or nodes_per_trial over 1",
        ),
        # Launched even at one process: the other seeds would train outside the launcher, unlike the first.
        ({"train": {"fsdp": "full_shard"}}, "repeats: repeats with train.fsdp is not supported yet"),
    ]:
        with pytest.raises(ConfigError, match=message):
            hpo.validate(study_dict(tiny_model, repeats=2, **changes))


def test_the_eval_subsample_is_stratified_fixed_and_off_where_an_earlier_evaluation_can_be_the_value(tiny_model):
    from hpo.trial.workbench import eval_subsample

    rows = [{"input_ids": [1], "labels": y} for y in [0] * 40 + [1] * 40 + [2] * 20]
    cfg = hpo.load_study(
        study_dict(tiny_model, eval_every={"epochs": 0.5, "subsample": 0.25, "subsample_min_rows": 10})
    )
    picked = eval_subsample(cfg, rows)
    assert picked == eval_subsample(cfg, rows) and len(set(picked)) == len(picked) == 25
    assert [sum(rows[i]["labels"] == y for i in picked) for y in (0, 1, 2)] == [10, 10, 5]
    assert eval_subsample(hpo.load_study(study_dict(tiny_model)), rows[:99]) is None  # 25% < 100 rows: every row
    assert eval_subsample(hpo.load_study(study_dict(tiny_model, objective={"at": "best"})), rows * 5) is None
