"""Finalists without a model: scoring, the user's function found and checked, the rankings printed and reported."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from rich.console import Console

from hpo.attrs import FINALIST
from hpo.config.finalists import scorer
from hpo.results.tables import studies_frame, trials_frame
from hpo.results.terminal import print_finalists, print_tables
from hpo.trial.generation import score


def test_builtin_scores_and_a_users_function_named_like_one(tmp_path):
    # A user's module named rouge_*: not one of rouge-score's types. ROUGE counts words of any script.
    (tmp_path / "rouge_mine.py").write_text("def same(predictions, references):\n    return 0.25\n")
    names = ["exact_match", "rougeL", "rouge_mine:same"]
    found = score(names, ["привет мир", "你好世界", "a b"], ["привет мир", "你好世界", "a c"], tmp_path)
    assert found == {
        "exact_match": pytest.approx(2 / 3),
        "rougeL": pytest.approx((1 + 1 + 0.5) / 3),
        "rouge_mine:same": 0.25,
    }


def test_a_users_function_comes_from_the_study_folder_it_is_named_in(tmp_path):
    # Two studies' folders, each with its own scoring.py: each study gets its own, not the first one imported.
    for folder, value in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "judge_here.py").write_text(f"def judge(predictions, references):\n    return {value}\n")
    assert scorer("judge_here:judge", tmp_path / "a")([], []) == 1
    assert scorer("judge_here:judge", tmp_path / "b")([], []) == 2


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import sys\nsys.exit(3)\n", "importing 'bad_mod' failed: SystemExit: 3"),
        ("raise RuntimeError('first\\nsecond')\n", "importing 'bad_mod' failed: RuntimeError: first"),
        ("def judge(predictions):\n    return 1\n", "'bad_mod:judge' does not take (predictions, references)"),
        ("judge = 3\n", "'bad_mod:judge' is not a function"),
    ],
)
def test_a_broken_users_function_is_one_line(tmp_path, source, message):
    (tmp_path / "bad_mod.py").write_text(source)
    with pytest.raises(ValueError, match=r"^[^\n]*$") as e:
        scorer("bad_mod:judge", tmp_path)
    assert message in str(e.value)


def _found(ranked, order=(3, 1, 0)):
    return {"rank_by": "rougeL", "by_objective": list(order), "ranked": ranked}


def _printed(found) -> str:
    out = io.StringIO()
    print_finalists(Console(file=out, width=300), "eval_loss", found)
    return out.getvalue()


def test_hpo_best_says_when_the_rankings_disagree_and_when_the_best_was_not_scored():
    scored = lambda n, r: {"trial": n, "value": 0.0, "scores": {"rougeL": r}}
    text = _printed(_found([scored(1, 0.9), scored(3, 0.5), scored(0, 0.1)]))
    assert "finalists by eval_loss: trial 3, trial 1, trial 0" in text
    assert "finalists by rougeL: trial 1 (rougeL=0.9000); trial 3 (rougeL=0.5000); trial 0" in text
    assert "the rankings disagree: eval_loss ranks trial 3 first, rougeL trial 1 (hpo best --trial 1" in text
    assert "disagree" not in _printed(_found([scored(3, 0.9), scored(1, 0.5)]))
    unscored = _printed(_found([scored(1, 0.9), {"trial": 3, "value": 0.0, "error": "not generated"}]))
    assert "trial 3 (no generation: not generated)" in unscored
    assert "trial 3, first by eval_loss, has no rougeL score" in unscored and "disagree" not in unscored


def test_the_report_shows_the_finalists_of_each_study_and_says_when_they_disagree():
    study = optuna.create_study(study_name="s", direction="minimize")
    study.set_user_attr("config", {"task": "causal-lm", "objective": {"metric": "eval_loss", "direction": "minimize"}})
    finalist = lambda r: {FINALIST: {"scores": {"rougeL": r}, "rank_by": "rougeL", "top": 2}}
    # trial 0 was among the best 2 when it finished, then pushed out by 1 and 2: not a finalist in the report; the
    # pruned trial's last value (0.1) ranks first under include_pruned, and is no finalist either
    for value, attrs in ((0.9, finalist(0.99)), (0.5, finalist(0.6)), (0.3, finalist(0.4)), (0.8, {})):
        study.add_trial(create_trial(value=value, intermediate_values={1: value}, user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.PRUNED, value=0.1, intermediate_values={1: 0.1}))
    trials = trials_frame([study], include_pruned=True).set_index("trial")
    assert trials["gen_rougeL"].dropna().to_dict() == {0: 0.99, 1: 0.6, 2: 0.4}
    assert trials["finalist"].dropna().to_dict() == {1: 0.6, 2: 0.4}
    out = io.StringIO()
    frame = trials.reset_index()
    print_tables(Console(file=out, width=300), frame, studies_frame([study], frame), include_pruned=True)
    text = " ".join(out.getvalue().split())
    assert "the rankings disagree (s): the objective ranks trial 2 first, the finalists' generations trial 1" in text
