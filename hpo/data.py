"""Labelled text data: read CSV/JSONL once, check it, tokenize it once per study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hpo.config import StudyConfig


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels; ``labels[i]`` names label id ``i``."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    labels: list[str]


def read_table(path: Path) -> pd.DataFrame:
    """A CSV, JSON Lines (``.jsonl``) or JSON records file as a DataFrame."""
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.read_json(path, lines=path.suffix.lower() == ".jsonl", dtype=False)


def load_text_data(cfg: StudyConfig) -> TextData:
    """Read and check the study's train and eval files.

    Raises:
        ConfigError: unreadable file, missing column, no rows, or an eval label
            that train never shows.
    """
    d = cfg.data
    frames = {}
    for split, path in (("train", d.train), ("eval", d.eval)):
        try:
            df = read_table(path)
        except (ValueError, OSError) as e:
            raise cfg.error(("data", split), f"cannot read {path.name}: {e}") from None
        for key, column in (("text_column", d.text_column), ("label_column", d.label_column)):
            if column not in df.columns:
                raise cfg.error(("data", key), f"column {column!r} not in {path.name} (columns: {', '.join(map(str, df.columns))})")
        if df.empty:
            raise cfg.error(("data", split), f"{path.name} has no rows")
        limit = d.max_train_rows if split == "train" else d.max_eval_rows
        frames[split] = df.sample(n=limit, random_state=0) if limit and limit < len(df) else df
    labels = sorted(set(frames["train"][d.label_column].astype(str)))
    unseen = sorted(set(frames["eval"][d.label_column].astype(str)) - set(labels))
    if unseen:
        raise cfg.error(("data", "eval"), f"eval labels not in train: {', '.join(unseen[:5])}")
    if len(labels) < 2:
        raise cfg.error(("data", "label_column"), f"need at least 2 labels in train, found {labels}")
    ids = {name: i for i, name in enumerate(labels)}

    def columns(df: pd.DataFrame) -> tuple[list[str], list[int]]:
        return df[d.text_column].astype(str).tolist(), [ids[v] for v in df[d.label_column].astype(str)]

    return TextData(*columns(frames["train"]), *columns(frames["eval"]), labels=labels)


def tokenize(
    texts: list[str], labels: list[int], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict[str, Any]]:
    """Tokenized rows without padding (the collator pads each batch to its longest row)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {**{k: v[i] for k, v in enc.items()}, "labels": label}
        for i, label in enumerate(labels)
    ]
