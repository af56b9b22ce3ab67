"""The one registry of tasks: names, the metrics each reports, the model class, PEFT task type and collator.

Importable without torch or transformers (config validation and its tests need no model): classes are
named here and imported when a trial needs them (:meth:`Task.model_class`, :func:`hpo.trial.finetune.collator`).

>>> TASKS["causal-lm"].metrics
('eval_loss', 'eval_perplexity')
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple[str, ...]  # what each evaluation reports, eval_loss first: the objectives a study may choose
    auto_model: str  # the transformers Auto class
    peft_task: str  # peft.TaskType name
    collator: str  # the transformers collator class that pads each batch
    classifies: bool  # whether the model gets num_labels / id2label

    def model_class(self) -> Any:
        return getattr(importlib.import_module("transformers"), self.auto_model)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "sequence-classification",
            ("eval_loss", "eval_accuracy", "eval_f1_macro"),
            "AutoModelForSequenceClassification",
            "SEQ_CLS",
            "DataCollatorWithPadding",
            classifies=True,
        ),
        Task(
            "token-classification",
            ("eval_loss", "eval_f1", "eval_precision", "eval_recall", "eval_accuracy"),  # entity level
            "AutoModelForTokenClassification",
            "TOKEN_CLS",
            "DataCollatorForTokenClassification",
            classifies=True,
        ),
        # No compute_metrics: gathering vocabulary-sized logits would cost memory for nothing but perplexity,
        # which hpo.trial.metrics.PerplexityCallback derives from the loss.
        Task(
            "causal-lm",
            ("eval_loss", "eval_perplexity"),
            "AutoModelForCausalLM",
            "CAUSAL_LM",
            "DataCollatorForSeq2Seq",
            classifies=False,
        ),
    )
}

#: Every metric a task reports → whether higher is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "eval_loss": False,
    "eval_accuracy": True,
    "eval_f1_macro": True,
    "eval_f1": True,
    "eval_precision": True,
    "eval_recall": True,
    "eval_perplexity": False,
}
assert {m for t in TASKS.values() for m in t.metrics} == set(HIGHER_IS_BETTER)
#: What a trial costs, as hpo measures it: an ``objectives:`` entry may name these too (lower is better).
#: ``eval_latency_ms``: milliseconds per example at the last evaluation, on the study's device at its eval batch.
COST_METRICS = ("train_seconds", "peak_memory_mb", "trainable_parameters", "eval_latency_ms")
