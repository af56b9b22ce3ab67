"""Training data for each task: read CSV/JSONL/JSON/CoNLL once and check every value the task reads.

Reading and checking need no torch or transformers (``hpo run`` checks the data before importing them);
each defect is one ``ConfigError`` that names the data file and the line (or JSON array index) to fix.
The files are read by :mod:`hpo.datafiles`, which keeps every record's line for the checks here;
:mod:`hpo.trial.tokens` tokenizes the checked examples.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from hpo.datafiles import DataError, Table, kind_of, read_table

if TYPE_CHECKING:
    from hpo.config import StudyConfig

TAG = re.compile(r"O|[BIES]-\S+")  # IOB2 (O, B-PER, I-PER) or IOBES (also E-PER, S-PER)
TAG_HELP = "O, B-TYPE or I-TYPE (IOBES: also E-TYPE, S-TYPE)"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")  # a JSON number, as CSV text
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON "\ud800" escapes: no tokenizer can encode them


@dataclass(frozen=True)
class Examples:
    """A task's examples before tokenization; ``labels[i]`` names class (or tag) id ``i``.

    sequence-classification: ``(text, label id)``; token-classification: ``(tokens, tag ids)``;
    causal-lm: ``(text, "")``, ``(prompt, response)``, or ``(messages, "")`` for ``data.format: chat``.
    """

    train: list[tuple[Any, Any]]
    eval: list[tuple[Any, Any]]
    labels: list[str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # split → SHA-256 of the bytes read, rows used
    test: list[tuple[Any, Any]] | None = None  # data.test: held out, never used to choose


def _scalar(value: Any, where: str, column: str) -> str:
    """A JSON scalar as text: booleans as JSON spells them, numbers as written; anything else fails."""
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        if bad:
            raise DataError(f"{where}: {column!r}: invalid Unicode (a lone surrogate \\u{ord(bad.group()):04x})")
        return value
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value)
    raise DataError(f"{where}: {column!r} is {kind_of(value)}, expected a string or a number")


def label_name(value: str) -> str:
    """One spelling per label: surrounding blanks go, and a number is written the shortest way.

    CSV gives ``"1.0"``, JSON gives ``1.0`` or ``1``: all three are class ``"1"``.

    >>> [label_name(v) for v in ("1.0", "1", "-0", "2.50", "1e3", " spam ", "007", "true")]
    ['1', '1', '0', '2.5', '1000', 'spam', '007', 'true']
    """
    value = value.strip()
    if not _NUMBER.fullmatch(value):
        return value
    number = Decimal(value)
    if abs(number.adjusted()) > 400:  # beyond any float: keep it as written (and out of int()'s reach)
        return value
    return str(int(number)) if number == number.to_integral_value() else format(number.normalize(), "f")


def _cell(table: Table, i: int, column: str) -> Any:
    record = table.records[i]
    if column not in record:
        raise DataError(f"{table.where[i]}: {column!r} missing")
    return record[column]


def _text(table: Table, i: int, column: str, empty_ok: bool = False) -> str:
    text = _scalar(_cell(table, i, column), table.where[i], column)
    if not empty_ok and not text.strip():
        raise DataError(f"{table.where[i]}: {column!r} is empty")
    return text


def _words(table: Table, i: int, column: str, tags: bool) -> list[str]:
    where, value = table.where[i], _cell(table, i, column)
    if not isinstance(value, list):
        raise DataError(f"{where}: {column!r} is {kind_of(value)}, expected a list of strings")
    if not value:
        raise DataError(f"{where}: {column!r} is an empty list")
    for j, item in enumerate(value):
        at = table.item_where[i][j] if table.item_where else where
        name = "tag" if table.item_where else f"{column}[{j}]"
        if not isinstance(item, str):
            raise DataError(f"{at}: {name!r} is {kind_of(item)}, expected a string")
        _scalar(item, at, name)
        if tags and not TAG.fullmatch(item):
            raise DataError(f"{at}: {name}: {item!r} is not an IOB tag ({TAG_HELP})")
        if not tags and not item.strip():
            raise DataError(f"{at}: {name!r} is empty: a word with no characters has no token for its tag")
    return value


def _messages(table: Table, i: int, column: str) -> list[dict[str, str]]:
    """A conversation: a list of ``{role, content}`` (strings) with an assistant turn that has something to learn."""
    where, value = table.where[i], _cell(table, i, column)
    if not isinstance(value, list):
        raise DataError(f"{where}: {column!r} is {kind_of(value)}, expected a list of {{role, content}} messages")
    if not value:
        raise DataError(f"{where}: {column!r} is an empty list: no conversation")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"].strip():
            raise DataError(f"{where}: {column}[{j}] is not a message: an object with a role (a string) and content")
        if "content" not in m:
            raise DataError(f"{where}: {column}[{j}]: 'content' missing")
        messages.append({**m, "content": _scalar(m["content"], where, f"{column}[{j}].content")})
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: {column!r} starts with an assistant turn: nothing before it that it answers")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: {column!r} has no assistant turn with content: nothing to learn")
    return messages


def _pairs(
    task: str, table: Table, columns: list[str], chat: bool = False
) -> tuple[list[tuple[Any, Any]], list[list[str]]]:
    """Every record as the task's ``(input, target)`` pair, checked; and each record's label names."""
    pairs, names = [], []
    first, second = [*columns, None][:2]
    for i in range(len(table.records)):
        if chat:  # causal-lm, conversations: the loss is on the assistant's turns
            pairs.append((_messages(table, i, first), ""))
        elif task == "sequence-classification":
            label = label_name(_scalar(_cell(table, i, second), table.where[i], second))
            pairs.append((_text(table, i, first), label))
            names.append([label])
        elif task == "token-classification":
            tokens, tags = _words(table, i, first, tags=False), _words(table, i, second, tags=True)
            if len(tokens) != len(tags):
                raise DataError(f"{table.where[i]}: {first!r} has {len(tokens)} items, {second!r} has {len(tags)}")
            pairs.append((tokens, tags))
            names.append(tags)
        elif second:  # causal-lm, prompt and response: the loss is on the response
            pairs.append((_text(table, i, first, empty_ok=True), _text(table, i, second)))
        else:
            pairs.append((_text(table, i, first), ""))
    return pairs, names


def load_examples(cfg: StudyConfig) -> Examples:
    """Read and check the study's train and eval files for its task; needs neither torch nor transformers.

    Every value the task reads is checked in every row: a text, label, prompt or response is a string
    or a number (not null, missing, a list or an object; a text or response not empty); tokens and tags
    are lists of strings of one length, tags in IOB. Labels are named by :func:`label_name`.

    Raises:
        ConfigError: unreadable or malformed file, missing column, no rows, a bad value (naming the file
            and line), a label or tag that train never shows, fewer than 2 labels.
    """
    d = cfg.data
    pairs, names, where, files = {}, {}, {}, {}
    splits = (("train", d.train), ("eval", d.eval), *((("test", d.test),) if d.test is not None else ()))
    for split, path in splits:
        table, rows, labels = _read_split(cfg, split, path)
        limit = {"train": d.max_train_rows, "eval": d.max_eval_rows}.get(split)  # test: every row, always
        # the same rows as DataFrame.sample(n=limit, random_state=0) of earlier versions
        keep = (
            pd.Series(range(len(rows))).sample(n=limit, random_state=0).tolist()
            if limit and limit < len(rows)
            else range(len(rows))
        )
        pairs[split] = [rows[i] for i in keep]
        files[split] = {"sha256": table.sha256, "rows": len(pairs[split])}
        if cfg.task != "causal-lm":
            names[split] = [labels[i] for i in keep]
            where[split] = [
                table.item_where[i] if table.item_where else [table.where[i]] * len(labels[i]) for i in keep
            ]
    if cfg.task == "causal-lm":
        return Examples(pairs["train"], pairs["eval"], labels=[], files=files, test=pairs.get("test"))
    labels = _label_names(cfg, names, where)
    ids = {name: i for i, name in enumerate(labels)}
    if cfg.task == "token-classification":
        coded = {s: [(tokens, [ids[t] for t in tags]) for tokens, tags in rows] for s, rows in pairs.items()}
    else:
        coded = {s: [(text, ids[label]) for text, label in rows] for s, rows in pairs.items()}
    return Examples(coded["train"], coded["eval"], labels, files, test=coded.get("test"))


def _read_split(cfg: StudyConfig, split: str, path: Path) -> tuple[Table, list[tuple[Any, Any]], list[list[str]]]:
    """One split's file: its table, every record as the task's pair, and each record's label names."""
    d = cfg.data
    columns = {
        "sequence-classification": {"text_column": d.text_column, "label_column": d.label_column},
        "token-classification": {"tokens_column": d.tokens_column, "tags_column": d.tags_column},
        "causal-lm": (
            {"messages_column": d.messages_column}
            if d.format == "chat"
            else {"prompt_column": d.prompt_column, "response_column": d.response_column}
            if d.prompt_column
            else {"text_column": d.text_column}
        ),
    }[cfg.task]
    try:
        table = read_table(path)
        if path.suffix.lower() == ".conll":
            table.columns = [d.tokens_column, d.tags_column]
            table.records = [{d.tokens_column: r["tokens"], d.tags_column: r["tags"]} for r in table.records]
        for key, column in columns.items():
            if column not in table.columns:
                raise cfg.error(
                    ("data", key),
                    f"column {column!r} not in {path.name} (columns: {', '.join(map(str, table.columns))})",
                )
        rows, labels = _pairs(cfg.task, table, list(columns.values()), chat=d.format == "chat")
    except DataError as e:
        raise cfg.error(("data", split), str(e)) from None
    return table, rows, labels


def _label_names(cfg: StudyConfig, names: dict[str, list[list[str]]], where: dict[str, list[list[str]]]) -> list[str]:
    """The labels train shows, sorted: one kind (no JSON true among numbers), every eval and test label
    among them, at least two."""
    labels = sorted({name for row in names["train"] for name in row})
    if (
        cfg.task == "sequence-classification"
        and {"true", "false"} & set(labels)
        and any(_NUMBER.fullmatch(name) for name in labels)
    ):  # JSON true among 0/1/2: a typo, not a class
        name, place = next(
            (n, at)
            for row, places in zip(names["train"], where["train"], strict=True)
            for n, at in zip(row, places, strict=True)
            if n in ("true", "false")
        )
        raise cfg.error(
            ("data", "train"),
            f"{place}: label {name!r} among numbers "
            f"({', '.join(repr(n) for n in labels if n != name)[:60]}): one kind of label",
        )
    known = set(labels)
    for split in [s for s in ("eval", "test") if s in names]:
        unseen = {}  # label → where the split first shows it, in the order it shows them
        for row, at in zip(names[split], where[split], strict=True):
            for name, place in zip(row, at, strict=True):
                if name not in known:
                    unseen.setdefault(name, place)
        if unseen:  # repr: an empty label must show as ''
            more = f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""
            shown = ", ".join(map(repr, list(unseen)[:5])) + more
            raise cfg.error(
                ("data", split),
                f"{split} labels not in train: {shown} (the first at {next(iter(unseen.values()))})",
            )
    if len(labels) < 2:
        raise cfg.error(
            ("data", "tags_column" if cfg.task == "token-classification" else "label_column"),
            f"need at least 2 labels in train, found {labels}",
        )
    return labels
