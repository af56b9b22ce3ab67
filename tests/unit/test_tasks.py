"""Token classification and causal-LM studies end to end on tiny models, full and LoRA; their data and metrics."""

import numpy as np
import pytest
from conftest import ner_study
from transformers import BertTokenizerFast, EvalPrediction

from hpo import load_study
from hpo.data import load_examples
from hpo.trial.metrics import _entity_metrics, macro_f1
from hpo.trial.tokens import IGNORE, tokenize


def test_entity_metrics_count_whole_entities_only():
    labels = ["B-FOOD", "I-FOOD", "O"]
    gold = np.array([[IGNORE, 0, 1, 2, IGNORE]])  # "fresh fish today": one FOOD entity of two words
    guess = np.eye(3)[[[2, 0, 2, 2, 2]]] * 5  # finds "fresh" but not "fish": half an entity is no entity
    m = _entity_metrics(labels)(EvalPrediction(predictions=guess, label_ids=gold))
    assert m["f1"] == 0.0 and m["accuracy"] == pytest.approx(2 / 3)


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 6, 50), rng.integers(0, 6, 50)),
        (np.array([0, 0, 1]), np.array([2, 2, 2])),
        (np.array([1, 1, 1]), np.array([1, 1, 1])),
        (rng.integers(0, 3, 40), rng.integers(1, 5, 40)),
    ]
    for gold, predicted in cases:
        assert macro_f1(gold, predicted) == pytest.approx(f1_score(gold, predicted, average="macro", zero_division=0))


def test_labels_go_to_the_first_sub_word(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "piz", "##za", "today"]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    (row,) = tokenize("token-classification", [(["pizza", "today"], [0, 2])], tokenizer, 16)
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "piz", "##za", "today", "[SEP]"]
    assert row["labels"] == [IGNORE, 0, IGNORE, 2, IGNORE]


def test_conll_files_read_like_jsonl(write_study):
    jsonl = load_examples(load_study(ner_study(write_study)))
    conll = load_examples(load_study(ner_study(write_study, "ner_eval.conll", name="conll.yaml")))
    assert conll.eval == jsonl.eval and len(conll.eval) == 16
