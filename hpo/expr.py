"""The one computation a study file can ask for: tiny arithmetic over parameter names.

``derive: "2 * r"`` and ``constraints: ["per_device_train_batch_size * gradient_accumulation_steps <= 128"]``
are parsed with :mod:`ast` and evaluated by walking a whitelist of nodes —
numbers, names, ``+ - * / // % **``, unary minus, ``min``/``max`` and, in
constraints, comparisons joined by ``and``/``or``. Nothing else parses, and
nothing is ever handed to ``eval``.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping
from typing import Any

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_FUNCTIONS = {"min": min, "max": max}
MAX_EXPONENT = 64
#: Every value an expression computes stays below 2**MAX_BITS in magnitude (floats overflow near 2**1024), so
#: no chain of operations can build a number that takes minutes to compute: ``((9**64)**64)**64`` stops here.
MAX_BITS = 1024
MAX_LENGTH = 1000  # characters
MAX_DEPTH = 50  # nested operations; the evaluator recurses once per level


class Expression:
    """A parsed expression; ``names`` are the parameters it reads.

    >>> Expression("2 * r").evaluate({"r": 8})
    16
    >>> Expression("a * b <= 128", condition=True).evaluate({"a": 32, "b": 8})
    False

    Raises:
        ValueError: on anything outside the language, naming what was found.
    """

    def __init__(self, source: str, condition: bool = False):
        self.source, self.condition = source, condition
        if len(source) > MAX_LENGTH:
            raise ValueError(f"expression longer than {MAX_LENGTH} characters")
        self.names: set[str] = set()
        try:
            tree = ast.parse(source.strip(), mode="eval")
            self._check_condition(tree.body) if condition else self._check(tree.body)
        except SyntaxError as e:
            raise ValueError(f"cannot parse {source!r}: {e.msg}") from None
        except (RecursionError, MemoryError):
            raise ValueError(f"expression nested too deeply: {source[:40]!r}…") from None
        self._tree = tree.body

    def _check_condition(self, node: ast.AST, depth: int = 0) -> None:
        """A condition is a comparison, or conditions joined by and/or: a bare name or number (``learning_rate``,
        ``1``) would be true for almost every trial, and arithmetic on a comparison mixes booleans into numbers."""
        if depth > MAX_DEPTH:
            raise ValueError(f"{self.source[:40]!r}…: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self._check_condition(value, depth + 1)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            for child in [node.left, *node.comparators]:
                self._check(child, depth + 1)
            if not {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - set(_FUNCTIONS):  # as a bare number
                raise ValueError(
                    f"{ast.unparse(node)!r} compares numbers only: it holds for every trial or for none; "
                    "compare a parameter or a metric"
                )
        else:
            self._check(node, depth)  # outside the language: that error first
            raise ValueError(
                f"{ast.unparse(node)!r} is not a condition: compare it, e.g. {ast.unparse(node)} <= 10 "
                "(comparisons joined by and/or)"
            )

    def _check(self, node: ast.AST, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"{self.source[:40]!r}…: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            _bounded(node.value)
            return
        if isinstance(node, ast.Name):
            if node.id in _FUNCTIONS:
                raise ValueError(f"{node.id!r} is a function: call it, e.g. {node.id}(a, b)")
            self.names.add(node.id)
            return
        children = None
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            children = [node.operand]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
            and not any(isinstance(a, ast.Starred) for a in node.args)
        ):
            if len(node.args) < 2:
                raise ValueError(
                    f"{ast.unparse(node)!r}: {node.func.id}() takes two or more values, e.g. {node.func.id}(a, 1)"
                )
            children = node.args
        if children is not None:
            for child in children:
                self._check(child, depth + 1)
            return
        allowed = "numbers, parameter names, + - * / // % **, min(), max()"
        if self.condition:
            allowed += ", comparisons, and/or"
        raise ValueError(f"{ast.unparse(node)!r} is not allowed in {self.source!r} (only {allowed})")

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """The value with ``values`` bound to names.

        Raises:
            KeyError: a name has no value (e.g. an inactive conditional parameter).
            ValueError: arithmetic failed (division by zero, a result over 2**1024, arithmetic on a text value).
        """
        try:
            return self._eval(self._tree, values)
        except (ZeroDivisionError, OverflowError, TypeError) as e:
            raise ValueError(f"{self.source!r}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{self.source!r}: {e}") from None

    def _eval(self, node: ast.AST, values: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp):
            left, right = _number(self._eval(node.left, values)), _number(self._eval(node.right, values))
            if isinstance(node.op, ast.Pow):
                if abs(right) > MAX_EXPONENT:
                    raise ValueError(f"exponent {right} is over {MAX_EXPONENT}")
                if right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_BITS:
                    raise ValueError(f"the result of {ast.unparse(node)} is over 2**{MAX_BITS}")
                if isinstance(left, int) and isinstance(right, float) and right != int(right) and left < 0:
                    raise ValueError(f"{ast.unparse(node)} is not a real number")
            return _bounded(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](_number(self._eval(node.operand, values)))
        if isinstance(node, ast.Call):
            return _FUNCTIONS[node.func.id](*(_number(self._eval(a, values)) for a in node.args))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, values)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self._eval(right_node, values)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        results = (self._eval(v, values) for v in node.values)  # BoolOp
        return all(results) if isinstance(node.op, ast.And) else any(results)


def _number(value: Any) -> int | float:
    """Arithmetic is on numbers only: ``2 * optim`` would repeat the text, ``optim * 10**9`` fill the memory."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"arithmetic on {value!r}, which is not a number")
    return value


def _bounded(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"the result is {value} (overflow)")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ValueError(f"a value over 2**{MAX_BITS}")
    return value
