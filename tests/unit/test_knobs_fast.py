"""hpo's own knobs, checked before a Trainer runs (the trained ones are in integration/test_knobs.py)."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hpo import ConfigError, load_study
from hpo.knobs import Knobs, head_modules, init_heads, split


def test_load_report_and_explicit_head_init(tiny_model):
    model, info = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, output_loading_info=True)
    heads = head_modules(info["missing_keys"])
    assert heads == ["classifier"]
    torch.manual_seed(0)
    init_heads(model, heads, Knobs(head_init="normal", head_init_std=0.5))
    assert model.classifier.weight.std().item() == pytest.approx(0.5, rel=0.3)
    assert not model.classifier.bias.any()
    init_heads(model, heads, Knobs(head_init="xavier"))
    bound = math.sqrt(6 / (32 + 3))
    assert model.classifier.weight.abs().max().item() <= bound and model.classifier.weight.std().item() < 0.5


def test_split():
    args, knobs = split({"learning_rate": 1e-3, "lr_scheduler_type": "reduce_lr_on_plateau", "momentum": 0.5})
    assert args == {"learning_rate": 1e-3, "lr_scheduler_type": "constant", "metric_for_best_model": "loss"}
    assert knobs.schedule == "reduce_lr_on_plateau" and knobs.momentum == 0.5


@pytest.mark.parametrize(
    "train, key, message",
    [
        ({"optimizer": "adamx"}, "train.optimizer", "'adamx'"),
        ({"head_lr_multiplier": 2, "head_learning_rate": 1e-3}, "train", "not both"),
        ({"lr_gamma": 2}, "train.lr_gamma", "less than or equal to 1"),
    ],
)
def test_bad_knobs_fail_before_any_trial(write_study, train, key, message):
    from hpo.trial.workbench import prepare

    with pytest.raises(ConfigError) as e:
        prepare(load_study(write_study(train=train)))
    (problem,) = e.value.problems
    assert problem.key == key and message in problem.message
