"""Generation-scored finalists (finalists:): the trials that may end among the top N generate once, scored by
built-in metrics and a user's function; pruned and failed trials never do."""

from __future__ import annotations

import json
import re

import pytest
from conftest import CHAT_PAIRS, CHATML, DATA, TINY_GPT2, chat_study
from inject import out_of_memory
from inprocess import hpo as cli
from optuna.trial import TrialState
from rich.console import Console

import hpo
from hpo import load_study
from hpo.attrs import FINALIST, GENERATE_SECONDS
from hpo.trial.generation import prompts, turn_end
from hpo.trial.workbench import prepare

SCORING = """
import json, os
CALLS = os.path.join(os.path.dirname(__file__), "calls.jsonl")
with open(CALLS, "a") as f:
    f.write(json.dumps({"imported": True}) + "\\n")

def judge(predictions, references):
    with open(CALLS, "a") as f:
        f.write(json.dumps({"predictions": predictions, "references": references}) + "\\n")
    return sum(len(p) for p in predictions) / 1000
"""


def _study(write_study, tokenizer, tmp_path, finalists=None, **changes):
    """A causal-LM LoRA study on prompt/response pairs, its finalists scored by a function of the study's folder
    (a module named for the test: a module of that name imported by an earlier test is not it)."""
    scoring = re.sub(r"\W", "_", f"scoring_{tmp_path.name}")
    (tmp_path / f"{scoring}.py").write_text(SCORING)
    finalists = finalists or {
        "top": 2,
        "generate": {"max_new_tokens": 4, "batch_size": 4},
        "metrics": ["exact_match", "rougeL", f"{scoring}:judge"],
        "rank_by": "rougeL",
    }
    return write_study(
        task="causal-lm",
        model={"config": TINY_GPT2, "tokenizer": str(tokenizer), "lora": {"r": 4, "target_modules": ["c_attn"]}},
        objective={"metric": "eval_loss"},
        data=changes.pop("data", None) or CHAT_PAIRS,
        train={"num_train_epochs": 2, "seed": 0},
        search_space={
            "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
            "r": {"type": "categorical", "choices": [2, 4]},
        },
        finalists=finalists,
        **changes,
    )


def test_the_finalists_are_the_trials_that_may_end_in_the_top_and_only_they_generate(
    write_study, tiny_bpe_tokenizer, tmp_path
):
    # 0, 1 complete; 2 (a learning rate that learns nothing) is pruned; 3 (rank 2: out of memory at every
    # micro-batch) fails; 4, 5 complete. Each trial that completes among the best 2 so far generates.
    enqueue = [
        {"learning_rate": 5e-3, "r": 4},
        {"learning_rate": 2e-3, "r": 4},
        {"learning_rate": 1e-6, "r": 4},
        {"learning_rate": 5e-3, "r": 2},
        {"learning_rate": 1e-2, "r": 4},
        {"learning_rate": 1e-3, "r": 4},
    ]
    path = _study(
        write_study,
        tiny_bpe_tokenizer,
        tmp_path,
        n_trials=6,
        enqueue=enqueue,
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        max_failures_in_a_row=5,
    )
    with out_of_memory(adapter_rank=2):
        study = hpo.run(path, console=Console(quiet=True))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) >= 1 and states[3] == TrialState.FAIL, states
    done: list[float] = []
    for t in study.trials:
        if t.state != TrialState.COMPLETE:
            assert FINALIST not in t.user_attrs and GENERATE_SECONDS not in t.user_attrs
            continue
        among = len(done) < 2 or t.value < sorted(done)[1]  # in the best 2 when it finished
        assert (FINALIST in t.user_attrs) == among, (t.number, t.value, done)
        done.append(t.value)
    for t in sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)[:2]:
        scores = t.user_attrs[FINALIST]["scores"]
        assert set(scores) == {"exact_match", "rougeL", f"scoring_{tmp_path.name}:judge"}
        assert 0 <= scores["exact_match"] <= 1 and 0 <= scores["rougeL"] <= 1
        assert t.user_attrs[FINALIST]["rows"] == 6 and t.user_attrs[GENERATE_SECONDS] > 0
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    # imported once by validation, once by the run's process (the same process here: Python's cache) ...
    assert sum(1 for c in calls if "imported" in c) == 1
    judged = [c for c in calls if "predictions" in c]
    assert len(judged) == sum(FINALIST in t.user_attrs for t in study.trials)
    refs = sorted(json.loads(line)["response"] for line in (DATA / "chat_eval.jsonl").read_text().splitlines())
    assert all(len(c["predictions"]) == 6 and sorted(c["references"]) == refs for c in judged)

    # hpo best: the objective's order of the top 2 beside the finalists' order by rougeL; the report's columns
    top = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)[:2]
    by_rouge = sorted(top, key=lambda t: -t.user_attrs[FINALIST]["scores"]["rougeL"])
    found = hpo.best(path)[1]["finalists"]
    assert found["by_objective"] == [t.number for t in top]
    assert [f["trial"] for f in found["ranked"]] == [t.number for t in by_rouge]
    ran = cli("best", path)
    assert ran.returncode == 0, ran.stderr
    assert f"finalists by eval_loss: trial {top[0].number}, trial {top[1].number}" in ran.stdout
    assert f"finalists by rougeL: trial {by_rouge[0].number} (exact_match=" in ran.stdout
    assert ("the rankings disagree" in ran.stdout) == (by_rouge[0].number != top[0].number)
    trials = hpo.report(path).trials
    assert trials["finalist"].notna().sum() == 2 and trials["gen_exact_match"].notna().sum() == len(judged)


def test_prompts_are_each_rows_tokens_before_its_last_learned_span(write_study, tiny_bpe_tokenizer, tmp_path):
    cfg = load_study(_study(write_study, tiny_bpe_tokenizer, tmp_path))
    bench = prepare(cfg)
    batch, references = prompts(bench.eval_rows, bench.tokenizer, None, None, cfg.data.max_length)
    pairs = [json.loads(line) for line in (DATA / "chat_eval.jsonl").read_text().splitlines()]
    found = sorted(zip((bench.tokenizer.decode(p) for p in batch), references, strict=True))
    assert found == sorted((p["prompt"], p["response"]) for p in pairs)
    assert len(prompts(bench.eval_rows, bench.tokenizer, 2, None, cfg.data.max_length)[0]) == 2  # max_rows
    # rows as long as max_length may have lost the end of their response: left out (a cut reference)
    shortest = min(len(row["input_ids"]) for row in bench.eval_rows)
    assert prompts(bench.eval_rows, bench.tokenizer, None, None, shortest) == ([], [])
    # a conversation: its last assistant turn, after everything before it (the assistant's header included)
    chat = prepare(load_study(chat_study(write_study, tiny_bpe_tokenizer, template=CHATML)))
    end = turn_end(chat.tokenizer)
    assert end == "<|im_end|>"
    batch, references = prompts(chat.eval_rows, chat.tokenizer, None, end, 256)
    conversations = [
        json.loads(line)["messages"] for line in (DATA / "conversations_eval.jsonl").read_text().splitlines()
    ]
    assert sorted(references) == sorted(c[-1]["content"] for c in conversations)
    for ids, reference in zip(batch, references, strict=True):
        text = chat.tokenizer.decode(ids)
        assert text.endswith("<|im_start|>assistant\n"), text  # the generation prompt, as the template writes it
        assert any(c[-1]["content"] == reference and all(m["content"] in text for m in c[:-1]) for c in conversations)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("raise RuntimeError('judge down')", "RuntimeError: judge down"),
        ("return float('nan')", "ValueError: {module}:judge returned nan, not a finite number"),
    ],
    ids=["raises", "nan"],
)
def test_a_scoring_error_leaves_the_trial_complete_with_the_error_recorded(
    write_study, tiny_bpe_tokenizer, tmp_path, body, error
):
    module = re.sub(r"\W", "_", f"failing_{tmp_path.name}")
    (tmp_path / f"{module}.py").write_text(f"def judge(predictions, references):\n    {body}\n")
    path = _study(write_study, tiny_bpe_tokenizer, tmp_path, {"metrics": [f"{module}:judge"]}, n_trials=1)
    study = hpo.run(path, console=Console(quiet=True))
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs[FINALIST] == {"error": error.format(module=module)}
    ran = cli("best", path)
    assert ran.returncode == 0 and f"trial 0 (no generation: {error.format(module=module)})" in ran.stdout


@pytest.mark.parametrize(
    ("finalists", "message"),
    [
        ({"metrics": ["nowhere:judge"]}, "finalists.metrics[0]: 'nowhere:judge': importing 'nowhere' failed"),
        ({"metrics": ["json:absent"]}, "finalists.metrics[0]: 'json:absent': module 'json' has no 'absent'"),
        ({"metrics": ["statistics:fmean", "json:__doc__"]}, "finalists.metrics[1]: 'json:__doc__' is not a function"),
        ({"metrics": ["bleu"]}, "finalists.metrics[0]: 'bleu': one of exact_match, rouge1, rouge2, rougeL"),
        ({"metrics": ["exact_match"], "rank_by": "rougeL"}, "rank_by: 'rougeL' is not one of metrics"),
        ({"split": "test"}, "finalists.split: needs data.test"),
    ],
)
def test_broken_finalists_are_refused_in_one_line(write_study, tiny_bpe_tokenizer, tmp_path, finalists, message):
    path = _study(write_study, tiny_bpe_tokenizer, tmp_path)
    raw = path.read_text().split("finalists:")[0]
    path.write_text(raw + "finalists: " + json.dumps(finalists) + "\n")
    with pytest.raises(hpo.ConfigError, match=re.escape(message)) as e:
        hpo.validate(path)
    assert len(e.value.problems) == 1 and "\n" not in str(e.value.problems[0])


def test_finalists_need_a_causal_lm_with_prompts(write_study, tiny_bpe_tokenizer, tmp_path):
    finalists = {"metrics": ["exact_match"]}
    with pytest.raises(hpo.ConfigError, match=re.escape("finalists: finalists generate text: task causal-lm")):
        hpo.validate(write_study(finalists=finalists))
    plain = {"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv")}
    with pytest.raises(
        hpo.ConfigError, match=re.escape("finalists: finalists generate from prompts: data.prompt_column")
    ):
        hpo.validate(_study(write_study, tiny_bpe_tokenizer, tmp_path, finalists, data=plain))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resources": {"pack": 2}}, "finalists: finalists do not generate in a pack yet"),
        ({"resources": {"processes_per_trial": 2}}, "finalists: finalists do not generate in multi-process trials"),
    ],
)
def test_finalists_are_refused_where_they_cannot_generate_yet(
    write_study, tiny_bpe_tokenizer, tmp_path, changes, message
):
    with pytest.raises(hpo.ConfigError, match=re.escape(message)):
        hpo.validate(_study(write_study, tiny_bpe_tokenizer, tmp_path, **changes))
