"""packing: a causal LM's training batches flattened into one row (no padding), each row attending to itself only."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CHAT_PAIRS, TINY_GPT2
from optuna.trial import TrialState
from rich.console import Console
from transformers import AutoModelForCausalLM

import hpo
from hpo import load_study
from hpo.trial.model import flattening, rows_kept_apart
from hpo.trial.workbench import prepare

NO_DROPOUT = {"dropout": {"type": "categorical", "choices": [0.0]}}


def _study(write_study, tokenizer, **changes):
    return write_study(
        task="causal-lm",
        model=changes.pop("model", {"config": TINY_GPT2, "tokenizer": str(tokenizer)}),
        objective={"metric": "eval_loss"},
        data=CHAT_PAIRS,
        **changes,
    )


class _RunOn(torch.nn.Module):
    """A causal LM whose attention does not read the rows from the position ids (as some remote-code models)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


def test_a_flattened_batch_computes_each_row_as_alone(write_study, tiny_bpe_tokenizer):
    bench = prepare(load_study(_study(write_study, tiny_bpe_tokenizer)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(bench.config).eval()
    rows = bench.train_rows[:4]
    batch = flattening()(rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    with torch.no_grad():
        flat = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert torch.allclose(flat[start : start + n], alone, atol=1e-5), "a row attended across its boundary"
            start += n
        # the check can fail: the same tokens with positions that run on mix the rows
        run_on = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(run_on[len(rows[0]["input_ids"]) :], flat[len(rows[0]["input_ids"]) :], atol=1e-3)
    assert rows_kept_apart(model, rows)
    assert not rows_kept_apart(_RunOn(model), rows)  # hpo's check before a packed trial trains
    # no row predicts the next one's first token: each row's first label is ignored
    starts = [0, *torch.cumsum(torch.tensor([len(r["input_ids"]) for r in rows]), 0).tolist()[:-1]]
    assert all(batch["labels"][0, s].item() == -100 for s in starts)


def test_packed_and_padded_training_reach_the_same_eval_loss(write_study, tiny_bpe_tokenizer, monkeypatch):
    # Dropout 0: the same trial trained on flattened and on padded batches; evaluations stay padded for both.
    from hpo.trial import trainer

    batches = []

    def counted():
        flat = flattening()
        return lambda features: batches.append(len(features)) or flat(features)

    monkeypatch.setattr(trainer, "flattening", counted)
    space = {**NO_DROPOUT, "packing": {"type": "categorical", "choices": [False, True]}}
    path = _study(
        write_study,
        tiny_bpe_tokenizer,
        n_trials=2,
        train={"num_train_epochs": 2, "seed": 0, "learning_rate": 5e-3, "per_device_train_batch_size": 4},
        search_space=space,
        enqueue=[{"dropout": 0.0, "packing": False}, {"dropout": 0.0, "packing": True}],
    )
    study = hpo.run(path, console=Console(quiet=True))
    padded, packed = study.trials
    assert (padded.state, packed.state) == (TrialState.COMPLETE, TrialState.COMPLETE)
    assert (padded.params["packing"], packed.params["packing"]) == (False, True)
    steps = sorted(padded.intermediate_values)
    assert steps == sorted(packed.intermediate_values)
    assert [packed.intermediate_values[s] for s in steps] == pytest.approx(
        [padded.intermediate_values[s] for s in steps], abs=1e-4
    )
    assert batches and set(batches) == {4}  # the packed trial's training batches went through the flattening


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"neftune_noise_alpha": 5.0}, "train.packing: packing with NEFTune, whose noise scales with the row's length"),
        (
            {"deepspeed": "ds.json"},
            "train.packing: packing is checked on the model before it trains, outside deepspeed",
        ),
    ],
)
def test_packing_is_refused_beside_what_it_would_change(write_study, tiny_bpe_tokenizer, train, message):
    path = _study(write_study, tiny_bpe_tokenizer, train={"num_train_epochs": 1, "packing": True, **train})
    with pytest.raises(hpo.ConfigError, match=re.escape(message)):
        hpo.validate(path)
    # packing: "false" (a string, as an environment variable gives it) is off: nothing refused for it
    off = _study(write_study, tiny_bpe_tokenizer, name="off.yaml", train={"num_train_epochs": 1, "packing": "false"})
    hpo.validate(off)


def test_packing_is_refused_where_it_cannot_flatten(write_study, tiny_model, tiny_bpe_tokenizer):
    with pytest.raises(
        hpo.ConfigError, match=re.escape("train.packing: packing flattens a causal LM's rows: task causal-lm")
    ):
        hpo.validate(write_study(train={"num_train_epochs": 1, "packing": True}))
    lora = {"config": TINY_GPT2, "tokenizer": str(tiny_bpe_tokenizer), "lora": {"r": 4}}
    with pytest.raises(hpo.ConfigError, match=re.escape("a pack's trials pad theirs: resources.pack 1")):
        hpo.validate(
            _study(
                write_study,
                tiny_bpe_tokenizer,
                model=lora,
                search_space={"packing": {"type": "categorical", "choices": [False, True]}},
                resources={"pack": 2},
            )
        )
