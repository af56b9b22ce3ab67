"""What differs between tasks: the model class, the PEFT task type, the collator and the metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    TrainerCallback,
)

from hpo.data import IGNORE


@dataclass(frozen=True)
class Task:
    auto_model: Any  # the transformers Auto class
    peft_task: str  # peft.TaskType name
    collator: Callable[[Any], Any]  # tokenizer → a collator that pads each batch
    metrics: Callable[[list[str]], Callable[[EvalPrediction], dict[str, float]]] | None  # labels → compute_metrics
    classifies: bool  # whether the model gets num_labels / id2label


def _sequence_metrics(labels: list[str]):
    def compute(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predicted = np.asarray(logits).argmax(-1)
        return {
            "accuracy": float(accuracy_score(pred.label_ids, predicted)),
            "f1_macro": float(f1_score(pred.label_ids, predicted, average="macro", zero_division=0)),
        }

    return compute


def _entity_metrics(labels: list[str]):
    """Entity-level precision, recall and F1 with seqeval (CoNLL semantics), on the first sub-word of each word."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    def compute(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predicted = np.asarray(logits).argmax(-1)
        gold, guess = [], []
        for p_row, l_row in zip(predicted, pred.label_ids, strict=True):
            keep = l_row != IGNORE
            gold.append([labels[i] for i in l_row[keep]])
            guess.append([labels[i] for i in p_row[keep]])
        return {
            "precision": float(precision_score(gold, guess, zero_division=0)),
            "recall": float(recall_score(gold, guess, zero_division=0)),
            "f1": float(f1_score(gold, guess, zero_division=0)),
            "accuracy": float(accuracy_score(gold, guess)),
        }

    return compute


TASKS = {
    "sequence-classification": Task(AutoModelForSequenceClassification, "SEQ_CLS", DataCollatorWithPadding,
                                    _sequence_metrics, classifies=True),
    "token-classification": Task(AutoModelForTokenClassification, "TOKEN_CLS", DataCollatorForTokenClassification,
                                 _entity_metrics, classifies=True),
    # Labels are given (the prompt is masked), so the seq2seq collator's padding of labels with -100 fits.
    # No compute_metrics: gathering vocabulary-sized logits would cost memory for nothing but perplexity.
    "causal-lm": Task(AutoModelForCausalLM, "CAUSAL_LM",
                      lambda tok: DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE), None, classifies=False),
}


class PerplexityCallback(TrainerCallback):
    """Adds ``eval_perplexity = exp(eval_loss)`` to each evaluation's metrics, before pruning reads them."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))  # exp overflows past ~709
