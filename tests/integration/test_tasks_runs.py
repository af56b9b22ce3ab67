"""Token classification and causal-LM studies end to end on tiny models, full and LoRA; their data and metrics."""

import json
import math

import pytest
from conftest import CHATML, DATA, LR, TINY_GPT2, chat_study, ner_study
from rich.console import Console

from hpo import load_study
from hpo.study.loop import run_study
from hpo.trial.tokens import IGNORE

quiet = Console(quiet=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_token_classification_reports_entity_f1(write_study, tiny_model, lora):
    model = {"name": str(tiny_model), "lora": {"r": 4}} if lora else str(tiny_model)
    study = run_study(load_study(ner_study(write_study, model=model)), quiet)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    attrs = study.best_trial.user_attrs
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_accuracy"} <= set(attrs)
    assert study.best_value == attrs["eval_f1"] > 0, "the tiny model finds some entities"
    assert attrs["load_report"]["missing_keys"] == ["classifier.bias", "classifier.weight"]


def lm_study(write_study, tokenizer, lora=False, **data):
    model = {"config": TINY_GPT2, "tokenizer": str(tokenizer), **({"lora": {"r": 4}} if lora else {})}
    return write_study(
        task="causal-lm",
        model=model,
        n_trials=2,
        objective={"metric": "eval_perplexity"},
        data={"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "max_length": 32, **data},
        train={"num_train_epochs": 2, "seed": 0},
        search_space=LR,
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_causal_lm_from_a_config_reports_perplexity(write_study, tiny_bpe_tokenizer, lora):
    study = run_study(load_study(lm_study(write_study, tiny_bpe_tokenizer, lora)), quiet)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    best = study.best_trial
    assert (
        best.value == best.user_attrs["eval_perplexity"] == pytest.approx(math.exp(best.user_attrs["last_eval_loss"]))
    )
    assert best.value < 300, "better than guessing among 300 tokens"
    assert best.user_attrs["load_report"]["from_config"] is True


def test_prompt_response_pairs_put_the_loss_on_the_response(write_study, tiny_bpe_tokenizer):
    path = lm_study(
        write_study,
        tiny_bpe_tokenizer,
        train=str(DATA / "chat_train.jsonl"),
        eval=str(DATA / "chat_eval.jsonl"),
        prompt_column="prompt",
        response_column="response",
    )
    cfg = load_study(path)
    from hpo.trial.workbench import prepare

    bench = prepare(cfg)
    row = bench.train_rows[0]  # prompt "hello there", response "greeting"
    masked = sum(1 for label in row["labels"] if label == IGNORE)
    assert masked == len(bench.tokenizer("hello there")["input_ids"])
    assert bench.tokenizer.decode([t for t in row["labels"] if t != IGNORE]) == "greeting<|endoftext|>"
    study = run_study(cfg, quiet)
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert json.loads(json.dumps(study.best_trial.user_attrs))["eval_perplexity"] > 1


def test_a_chat_study_trains_on_the_assistant_turns(write_study, tiny_bpe_tokenizer):
    study = run_study(load_study(chat_study(write_study, tiny_bpe_tokenizer, template=CHATML)), quiet)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert study.best_trial.user_attrs["eval_perplexity"] < 300, "better than guessing among 300 tokens"
