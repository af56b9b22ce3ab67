"""Training data for each task: read CSV/JSONL/CoNLL once, check it, tokenize it once per study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hpo.config import StudyConfig

IGNORE = -100  # the label that loss functions skip: special tokens, sub-words after the first, prompts


@dataclass(frozen=True)
class Examples:
    """A task's examples before tokenization; ``labels[i]`` names class (or tag) id ``i``.

    sequence-classification: ``(text, label id)``; token-classification: ``(tokens, tag ids)``;
    causal-lm: ``(text, "")`` or ``(prompt, response)``.
    """

    train: list[tuple[Any, Any]]
    eval: list[tuple[Any, Any]]
    labels: list[str]


def read_table(path: Path) -> pd.DataFrame:
    """A CSV, JSON Lines (``.jsonl``), JSON records or CoNLL (``.conll``: token … tag per line) file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix == ".conll":
        return _read_conll(path)
    return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)


def _read_conll(path: Path) -> pd.DataFrame:
    # CoNLL: one token per line, its tag in the last column, sentences separated by blank lines,
    # -DOCSTART- lines between documents. Small enough to parse by hand (datasets' loader needs a script).
    sentences, tokens, tags = [], [], []
    for line in [*path.read_text().splitlines(), ""]:
        fields = line.split()
        if fields and fields[0] != "-DOCSTART-":
            tokens.append(fields[0])
            tags.append(fields[-1])
        elif tokens:
            sentences.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
    return pd.DataFrame(sentences, columns=["tokens", "tags"])


def load_examples(cfg: StudyConfig) -> Examples:
    """Read and check the study's train and eval files for its task.

    Raises:
        ConfigError: unreadable file, missing column, no rows, a label or tag
            that train never shows, tokens and tags of different lengths.
    """
    d = cfg.data
    columns = {
        "sequence-classification": {"text_column": d.text_column, "label_column": d.label_column},
        "token-classification": {"tokens_column": d.tokens_column, "tags_column": d.tags_column},
        "causal-lm": ({"prompt_column": d.prompt_column, "response_column": d.response_column} if d.prompt_column
                      else {"text_column": d.text_column}),
    }[cfg.task]
    frames = {}
    for split, path in (("train", d.train), ("eval", d.eval)):
        try:
            df = read_table(path)
        except (ValueError, OSError) as e:
            raise cfg.error(("data", split), f"cannot read {path.name}: {e}") from None
        if path.suffix.lower() == ".conll":
            df = df.rename(columns={"tokens": d.tokens_column, "tags": d.tags_column})
        for key, column in columns.items():
            if column not in df.columns:
                raise cfg.error(("data", key), f"column {column!r} not in {path.name} (columns: {', '.join(map(str, df.columns))})")
        if df.empty:
            raise cfg.error(("data", split), f"{path.name} has no rows")
        limit = d.max_train_rows if split == "train" else d.max_eval_rows
        frames[split] = df.sample(n=limit, random_state=0) if limit and limit < len(df) else df
    first, second = [*columns.values(), None][:2]
    if cfg.task == "causal-lm":
        pairs = {s: list(zip(df[first].astype(str), df[second].astype(str) if second else [""] * len(df), strict=True))
                 for s, df in frames.items()}
        return Examples(pairs["train"], pairs["eval"], labels=[])
    if cfg.task == "token-classification":
        for split, df in frames.items():
            for i, (tokens, tags) in enumerate(zip(df[first], df[second], strict=True)):
                if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
                    raise cfg.error(("data", split), f"row {i + 1}: {first!r} and {second!r} must be lists of equal length")
        seen = {s: [str(t) for tags in df[second] for t in tags] for s, df in frames.items()}
    else:
        seen = {s: df[second].astype(str).tolist() for s, df in frames.items()}
    labels = sorted(set(seen["train"]))
    unseen = sorted(set(seen["eval"]) - set(labels))
    if unseen:
        raise cfg.error(("data", "eval"), f"eval labels not in train: {', '.join(unseen[:5])}")
    if len(labels) < 2:
        raise cfg.error(("data", "tags_column" if cfg.task == "token-classification" else "label_column"),
                        f"need at least 2 labels in train, found {labels}")
    ids = {name: i for i, name in enumerate(labels)}

    def pairs(df: pd.DataFrame) -> list[tuple[Any, Any]]:
        if cfg.task == "token-classification":
            return [([str(t) for t in tokens], [ids[str(t)] for t in tags]) for tokens, tags in zip(df[first], df[second], strict=True)]
        return [(text, ids[label]) for text, label in zip(df[first].astype(str), df[second].astype(str), strict=True)]

    return Examples(pairs(frames["train"]), pairs(frames["eval"]), labels)


def tokenize(task: str, examples: list[tuple[Any, Any]], tokenizer: PreTrainedTokenizerBase,
             max_length: int) -> list[dict[str, Any]]:
    """Tokenized rows without padding (the task's collator pads each batch to its longest row).

    token-classification labels the first sub-word of each word and ignores the rest; causal-lm
    predicts every token of a text, or only the response's tokens after a prompt.
    """
    if task == "sequence-classification":
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": label} for i, (_, label) in enumerate(examples)]
    if task == "token-classification":
        enc = tokenizer([t for t, _ in examples], is_split_into_words=True, truncation=True, max_length=max_length)
        rows = []
        for i, (_, tags) in enumerate(examples):
            words, previous, labels = enc.word_ids(i), None, []
            for w in words:
                labels.append(IGNORE if w is None or w == previous else tags[w])
                previous = w
            rows.append({**{k: v[i] for k, v in enc.items()}, "labels": labels})
        return rows
    rows = []
    for prompt, response in examples:
        if not response:  # plain text: predict every token
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
            continue
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (head + tail)[:max_length]
        labels = ([IGNORE] * len(head) + tail)[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows
