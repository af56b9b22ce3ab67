"""Training data for each task: read CSV/JSONL/JSON/CoNLL once and check every value the task reads.

Reading and checking need no torch or transformers (``hpo run`` checks the data before importing them);
each defect is one ``ConfigError`` that names the data file and the line (or JSON array index) to fix.
:mod:`hpo.trial.tokens` tokenizes the checked examples. Four readers and three tasks' checks make this module
over 400 lines; each check needs the reader's line numbers, so they stay together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from hpo.config import StudyConfig

TAG = re.compile(r"O|[BIES]-\S+")  # IOB2 (O, B-PER, I-PER) or IOBES (also E-PER, S-PER)
TAG_HELP = "O, B-TYPE or I-TYPE (IOBES: also E-TYPE, S-TYPE)"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")  # a JSON number, as CSV text
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON "\ud800" escapes: no tokenizer can encode them
_BLANK = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


@dataclass(frozen=True)
class Examples:
    """A task's examples before tokenization; ``labels[i]`` names class (or tag) id ``i``.

    sequence-classification: ``(text, label id)``; token-classification: ``(tokens, tag ids)``;
    causal-lm: ``(text, "")`` or ``(prompt, response)``.
    """

    train: list[tuple[Any, Any]]
    eval: list[tuple[Any, Any]]
    labels: list[str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # split → SHA-256 of the bytes read, rows used
    test: list[tuple[Any, Any]] | None = None  # data.test: held out, never used to choose


class DataError(Exception):
    """A defect in a data file, as ``FILE:LINE: message``; :func:`load_examples` raises it as a ``ConfigError``."""


@dataclass
class Table:
    """The records of one data file and where each starts: ``where[i]`` is ``FILE:LINE`` (JSON arrays add ``[i]``)."""

    columns: list[str]
    records: list[dict[str, Any]]
    where: list[str]
    item_where: list[list[str]] = field(default_factory=list)  # CoNLL: ``FILE:LINE`` of each token of each record
    sha256: str = ""  # of the bytes read: what a study's fingerprint records, even if the file changes later


def read_table(path: Path, shown: str | None = None) -> Table:
    """Read a CSV, JSON Lines (``.jsonl``), JSON array of records or CoNLL (``.conll``: token … tag) file.

    ``shown`` is how messages name the file (default: ``path``, relative to the working directory when
    under it). CSV values are strings; JSON values keep
    their types. A CoNLL file gives one record ``{"tokens": [...], "tags": [...]}`` per sentence.

    Raises:
        DataError: unreadable, not UTF-8, empty, or not valid for its format; the message names the line.
    """
    shown = shown or _shown(path)
    text, digest = _read_text(path, shown)
    if not re.search(r"\S", text):
        raise DataError(f"{shown}: the file is empty")
    read = {".csv": _read_csv, ".conll": _read_conll, ".jsonl": _read_jsonl}.get(path.suffix.lower(), _read_json)
    table = read(text, shown)
    table.sha256 = digest
    return table


def _shown(path: Path) -> str:
    """``path`` as messages show it: relative to the working directory when under it, like the study file."""
    full = os.path.abspath(path)
    relative = os.path.relpath(full)
    return full if relative.startswith("..") else relative


def _read_text(path: Path, shown: str) -> tuple[str, str]:
    # The same rules as study files (config._decode): UTF-8, an optional BOM, nothing else.
    try:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
    except OSError as e:
        raise DataError(f"{shown}: cannot read: {e.strerror or e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:2]:
        raise DataError(f"{shown}: the file is UTF-16: save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{shown}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}): save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise DataError(f"{shown}:{text.count(chr(10), 0, nul) + 1}: a NUL byte: not a text file?")
    return text, digest


def _read_csv(text: str, shown: str) -> Table:
    records, where = [], []
    header: list[str] = []
    header_line = start = 1
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit(2**31 - 1)  # one cell may be megabytes; the default stops at 128 kB
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if not header:
                header, header_line = fields, line
                twice = next((c for i, c in enumerate(fields) if c in fields[:i]), None)
                if twice is not None:
                    raise DataError(f"{shown}:{line}: column {twice!r} twice in the header")
                continue
            if len(fields) != len(header):
                hint = (
                    "a missing cell?"
                    if len(fields) < len(header)
                    else "a comma in a value that is not in double quotes?"
                )
                raise DataError(
                    f"{shown}:{line}: {len(fields)} cell{'s' * (len(fields) > 1)}, but the header "
                    f"(line {header_line}) has {len(header)}: {hint}"
                )
            records.append(dict(zip(header, fields, strict=True)))
            where.append(f"{shown}:{line}")
    except csv.Error as e:
        raise DataError(f"{shown}:{reader.line_num}: not valid CSV: {e}") from None
    finally:
        csv.field_size_limit(limit)
    if not records:
        raise DataError(f"{shown}: the file has no rows, only a header")
    return Table(header, records, where)


def _read_jsonl(text: str, shown: str) -> Table:
    # Parsed in place (raw_decode), not line by line: a copy of each line would double a 50 MB cell.
    decoder, records, where, columns = json.JSONDecoder(), [], [], {}
    pos, n = 0, 0
    while pos <= len(text):
        end = text.find("\n", pos)
        end, n = len(text) if end < 0 else end, n + 1
        start = _BLANK.match(text, pos, end).end()
        if start < end:
            try:
                record, stop = decoder.raw_decode(text, start)
            except json.JSONDecodeError as e:
                raise DataError(f"{shown}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting past the stack
                raise DataError(f"{shown}:{n}: not valid JSON: {_first_line(e)}") from None
            if stop > end:
                raise DataError(f"{shown}:{n}: a record spans lines: JSON Lines has one record per line")
            extra = _BLANK.match(text, stop, end).end()
            if extra != end:
                raise DataError(f"{shown}:{n}: not valid JSON: Extra data (column {extra - pos + 1})")
            if not isinstance(record, dict):
                raise DataError(f"{shown}:{n}: expected one JSON object per line, found {_kind(record)}")
            records.append(record)
            where.append(f"{shown}:{n}")
            columns.update(dict.fromkeys(record))
        pos = end + 1
    if not records:
        raise DataError(f"{shown}: the file has no rows")
    return Table(list(columns), records, where)


def _read_json(text: str, shown: str) -> Table:
    # An array of records, parsed one element at a time so that each record knows its line.
    decoder = json.JSONDecoder()
    i = _BLANK.match(text).end()
    try:
        if text[i] != "[":
            found = decoder.decode(text)  # the JSON error, if any; else say what the file holds instead
            raise DataError(f"{shown}: expected a list of records [{{...}}, {{...}}], found {_kind(found)}")
        records, where, columns = [], [], {}
        i, line, counted = _BLANK.match(text, i + 1).end(), 1, 0
        while text[i : i + 1] != "]":
            line, counted = line + text.count("\n", counted, i), i
            record, i = decoder.raw_decode(text, i)
            if not isinstance(record, dict):
                raise DataError(f"{shown}:{line}: [{len(records)}]: expected a record {{...}}, found {_kind(record)}")
            records.append(record)
            where.append(f"{shown}:{line}: [{len(records) - 1}]")
            columns.update(dict.fromkeys(record))
            i = _BLANK.match(text, i).end()
            if text[i : i + 1] == ",":
                i = _BLANK.match(text, i + 1).end()
            elif text[i : i + 1] != "]":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
        if text[_BLANK.match(text, i + 1).end() :]:
            raise json.JSONDecodeError("Extra data", text, _BLANK.match(text, i + 1).end())
    except json.JSONDecodeError as e:
        raise DataError(f"{shown}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{shown}: not valid JSON: {_first_line(e)}") from None
    if not records:
        raise DataError(f"{shown}: the file has no rows")
    return Table(list(columns), records, where)


def _read_conll(text: str, shown: str) -> Table:
    # One token per line, its tag in the last column, sentences separated by blank lines, -DOCSTART-
    # lines between documents. Every token line has as many columns as the first one: a line without
    # its tag, or with a stray column, must not turn into a tag.
    records, where, item_where = [], [], []
    tokens, tags, lines = [], [], []
    n_columns = first = 0
    for n, line in enumerate([*text.split("\n"), ""], 1):
        fields = line.split()
        if fields and fields[0] != "-DOCSTART-":
            if len(fields) == 1:
                raise DataError(f"{shown}:{n}: one column ({fields[0]!r}): a CoNLL line is 'token … tag'")
            if not n_columns:
                n_columns, first = len(fields), n
            elif len(fields) != n_columns:
                raise DataError(f"{shown}:{n}: {len(fields)} columns, but line {first} has {n_columns}")
            tokens.append(fields[0])
            tags.append(fields[-1])
            lines.append(n)
        elif tokens:
            records.append({"tokens": tokens, "tags": tags})
            where.append(f"{shown}:{lines[0]}")
            item_where.append([f"{shown}:{n}" for n in lines])
            tokens, tags, lines = [], [], []
    if not records:
        raise DataError(f"{shown}: the file has no sentences")
    return Table(["tokens", "tags"], records, where, item_where)


def _first_line(e: BaseException) -> str:
    return (str(e) or type(e).__name__).splitlines()[0]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}[type(value)]


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
    raise DataError(f"{where}: {column!r} is {_kind(value)}, expected a string or a number")


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
        raise DataError(f"{where}: {column!r} is {_kind(value)}, expected a list of strings")
    if not value:
        raise DataError(f"{where}: {column!r} is an empty list")
    for j, item in enumerate(value):
        at = table.item_where[i][j] if table.item_where else where
        name = "tag" if table.item_where else f"{column}[{j}]"
        if not isinstance(item, str):
            raise DataError(f"{at}: {name!r} is {_kind(item)}, expected a string")
        _scalar(item, at, name)
        if tags and not TAG.fullmatch(item):
            raise DataError(f"{at}: {name}: {item!r} is not an IOB tag ({TAG_HELP})")
        if not tags and not item.strip():
            raise DataError(f"{at}: {name!r} is empty: a word with no characters has no token for its tag")
    return value


def _pairs(task: str, table: Table, columns: list[str]) -> tuple[list[tuple[Any, Any]], list[list[str]]]:
    """Every record as the task's ``(input, target)`` pair, checked; and each record's label names."""
    pairs, names = [], []
    first, second = [*columns, None][:2]
    for i in range(len(table.records)):
        if task == "sequence-classification":
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
    columns = {
        "sequence-classification": {"text_column": d.text_column, "label_column": d.label_column},
        "token-classification": {"tokens_column": d.tokens_column, "tags_column": d.tags_column},
        "causal-lm": (
            {"prompt_column": d.prompt_column, "response_column": d.response_column}
            if d.prompt_column
            else {"text_column": d.text_column}
        ),
    }[cfg.task]
    pairs, names, where, files = {}, {}, {}, {}
    splits = (("train", d.train), ("eval", d.eval), *((("test", d.test),) if d.test is not None else ()))
    for split, path in splits:
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
            rows, labels = _pairs(cfg.task, table, list(columns.values()))
        except DataError as e:
            raise cfg.error(("data", split), str(e)) from None
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
    ids = {name: i for i, name in enumerate(labels)}
    for split in [s for s in ("eval", "test") if s in names]:
        unseen = {}  # label → where the split first shows it, in the order it shows them
        for row, at in zip(names[split], where[split], strict=True):
            for name, place in zip(row, at, strict=True):
                if name not in ids:
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
    if cfg.task == "token-classification":
        coded = {s: [(tokens, [ids[t] for t in tags]) for tokens, tags in rows] for s, rows in pairs.items()}
    else:
        coded = {s: [(text, ids[label]) for text, label in rows] for s, rows in pairs.items()}
    return Examples(coded["train"], coded["eval"], labels, files, test=coded.get("test"))
