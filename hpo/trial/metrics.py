"""The metrics each task computes at an evaluation (``compute_metrics``), and perplexity from the loss."""

from __future__ import annotations

import math

import numpy as np
from transformers import EvalPrediction, TrainerCallback

from hpo.trial.tokens import IGNORE


def macro_f1(gold: np.ndarray, predicted: np.ndarray) -> float:
    """scikit-learn's ``f1_score(average="macro", zero_division=0)``: the mean F1 over every label that occurs.

    By hand because importing ``sklearn.metrics`` took 1.2 s of a 4-trial study's first trial (cProfile),
    for six lines of counting; tests/unit/test_tasks.py checks it against scikit-learn.
    """
    present = np.union1d(gold, predicted)
    tp = np.array([np.sum((gold == c) & (predicted == c)) for c in present])
    wrong = np.array([np.sum(gold == c) + np.sum(predicted == c) for c in present]) - 2 * tp  # FP + FN
    f1 = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(present)), where=(2 * tp + wrong) > 0)
    return float(f1.mean())


def _sequence_metrics(labels: list[str]):
    def compute(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predicted = np.asarray(logits).argmax(-1)
        gold = np.asarray(pred.label_ids)
        return {"accuracy": float((predicted == gold).mean()), "f1_macro": macro_f1(gold, predicted)}

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


#: Task name → (labels → compute_metrics); tasks not listed evaluate the loss only.
COMPUTE = {"sequence-classification": _sequence_metrics, "token-classification": _entity_metrics}


class PerplexityCallback(TrainerCallback):
    """Adds ``eval_perplexity = exp(eval_loss)`` to each evaluation's metrics, before pruning reads them."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))  # exp overflows past ~709
