"""The data files as records with their places: CSV, JSON Lines, a JSON array of records, CoNLL.

Each record knows the ``FILE:LINE`` it starts at (JSON arrays add ``[i]``, CoNLL each token's line), so that
:mod:`hpo.data`'s checks of every value the task reads name the line to fix. UTF-8 only, like study files;
no torch.
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
from pathlib import Path
from typing import Any

_BLANK = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


class DataError(Exception):
    """A defect in a data file, as ``FILE:LINE: message``; :func:`hpo.data.load_examples` raises it as a
    ``ConfigError``."""


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
                raise DataError(f"{shown}:{n}: expected one JSON object per line, found {kind_of(record)}")
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
            raise DataError(f"{shown}: expected a list of records [{{...}}, {{...}}], found {kind_of(found)}")
        records, where, columns = [], [], {}
        i, line, counted = _BLANK.match(text, i + 1).end(), 1, 0
        while text[i : i + 1] != "]":
            line, counted = line + text.count("\n", counted, i), i
            record, i = decoder.raw_decode(text, i)
            if not isinstance(record, dict):
                raise DataError(f"{shown}:{line}: [{len(records)}]: expected a record {{...}}, found {kind_of(record)}")
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


def kind_of(value: Any) -> str:
    """How a message names a JSON value's type: ``a string``, ``a list``, ``null``, ``a boolean (true)``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}[type(value)]
