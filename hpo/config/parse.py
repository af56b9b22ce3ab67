"""Stage 1, parse: one YAML file → plain data and a source map of its lines, refusing hostile input.

A file that is not a small regular file, not UTF-8, nested too deep, an alias bomb, a recursive alias
or a mapping with a duplicate key is one ``FILE:LINE`` problem, found before any value is built (the
size before reading, the rest on PyYAML's node graph).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, format_path

#: Values a study file may hold once aliases are expanded; a real one has a few hundred. Beyond this it is
#: an alias bomb ("billion laughs": 1 KB of nested aliases that expands to 10^9 values) or not a study file.
MAX_NODES = 100_000
MAX_DEPTH = 64  # nesting levels; a study file needs about 6
MAX_FILE_BYTES = 10 * 2**20  # a study file is a few KB; this keeps /dev/zero from filling the memory


def read_yaml(path: Path) -> tuple[Any, SourceMap]:
    """Parse one YAML file, refusing what would hang or silently mislead before building any value.

    Refused, each as one ``FILE:LINE`` problem: anything but a regular file under ``MAX_FILE_BYTES``
    (a FIFO, ``/dev/zero``, a symlink loop), bytes that are not UTF-8, and what :func:`parse_yaml`
    refuses.
    """
    file = str(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([Problem(file, None, "", "not a regular file")])
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(
                [Problem(file, None, "", f"{info.st_size:,} bytes: a study file is at most {MAX_FILE_BYTES:,}")]
            )
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise ConfigError([Problem(file, None, "", f"cannot read: {e.strerror or e}")]) from None
    return parse_yaml(_decode(raw_bytes, file), file)


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """YAML ``text`` (from ``file``) → (data, source map), safely.

    Refused, each as one ``FILE:LINE`` problem: duplicate keys, nesting deeper than ``MAX_DEPTH``,
    recursive aliases, and more than ``MAX_NODES`` values after alias expansion. PyYAML composes
    aliases as shared nodes, so its node graph stays as small as the text; every check walks that
    graph with memoisation, never the expanded tree.

    >>> data, source = parse_yaml("study: tiny\\ntrain:\\n  learning_rate: 0.1\\n", "s.yaml")
    >>> data["train"], source.locate(("train", "learning_rate"))
    ({'learning_rate': 0.1}, ('s.yaml', 3))

    Raises:
        ConfigError: naming the line.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_graph(node, file)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError([Problem(file, line, "", f"YAML syntax error: {e.problem or e.context}{col}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(file, None, "", f"YAML error: {str(e)[:200]}")]) from None
    except RecursionError:  # PyYAML composes recursively: ~300 levels of [ or { exhaust the stack
        raise ConfigError(
            [Problem(file, loader.get_mark().line + 1, "", f"nested deeper than {MAX_DEPTH} levels")]
        ) from None
    finally:
        loader.dispose()
    source = SourceMap()
    source.default_file = file
    if node is not None:
        _index(node, (), file, source)
    return data, source


def _decode(raw: bytes, file: str) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and b"\x00" in raw[:2]):
        raise ConfigError([Problem(file, None, "", "the file is UTF-16: save it as UTF-8")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            [Problem(file, line, "", f"not UTF-8 (byte 0x{raw[e.start]:02x}): save the file as UTF-8")]
        ) from None


def _check_graph(root: yaml.Node, file: str) -> None:
    """Duplicate keys, nesting depth, recursive aliases and the expanded size, in one memoised walk."""
    sizes: dict[int, int] = {}  # id(node) → values under it once aliases are expanded
    open_nodes: set[int] = set()  # on the current path: seeing one again is a recursive alias

    def fail(node: yaml.Node, at: KeyPath, message: str) -> ConfigError:
        return ConfigError([Problem(file, node.start_mark.line + 1, format_path(at), message)])

    def size(node: yaml.Node, at: KeyPath, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise fail(node, at, "an alias refers to a value that contains it (recursive alias)")
        if depth > MAX_DEPTH:
            raise fail(node, at, f"nested deeper than {MAX_DEPTH} levels")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):  # two << merge keys too: the second would silently win
                    if key.value in seen:
                        raise fail(key, at + (key.value,), f"duplicate key (first on line {seen[key.value]}); keep one")
                    seen[key.value] = key.start_mark.line + 1
                total += size(key, at, depth + 1) + size(value, at + (str(key.value),), depth + 1)
                if total > MAX_NODES:
                    raise fail(
                        key,
                        at + (str(key.value),),
                        f"over {MAX_NODES:,} values once aliases are expanded (an alias bomb?)",
                    )
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, at + (i,), depth + 1)
                if total > MAX_NODES:
                    raise fail(item, at + (i,), f"over {MAX_NODES:,} values once aliases are expanded (an alias bomb?)")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root, (), 0)


def _index(node: yaml.Node, at: KeyPath, file: str, source: SourceMap) -> None:
    source.add(at, file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _index(value, at + (str(key.value),), file, source)
            source.add(at + (str(key.value),), file, key.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, at + (i,), file, source)
