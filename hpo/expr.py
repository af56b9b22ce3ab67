"""The one computation a study file can ask for: tiny arithmetic over parameter names.

``derive: "2 * r"`` and ``constraints: ["per_device_train_batch_size * gradient_accumulation_steps <= 128"]``
are parsed with :mod:`ast` and evaluated by walking a whitelist of nodes —
numbers, names, ``+ - * / // % **``, unary minus, ``min``/``max`` and, in
constraints, comparisons joined by ``and``/``or``. Nothing else parses, and
nothing is ever handed to ``eval``.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FUNCTIONS = {"min": min, "max": max}
MAX_EXPONENT = 64  # keeps 10 ** 10 ** 10 from hanging validation


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
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as e:
            raise ValueError(f"cannot parse {source!r}: {e.msg}") from None
        self.names: set[str] = set()
        self._check(tree.body)
        self._tree = tree.body

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
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
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
              and node.args and not node.keywords):
            children = node.args
        elif self.condition and isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            children = [node.left, *node.comparators]
        elif self.condition and isinstance(node, ast.BoolOp):
            children = node.values
        if children is not None:
            for child in children:
                self._check(child)
            return
        allowed = "numbers, parameter names, + - * / // % **, min(), max()"
        if self.condition:
            allowed += ", comparisons, and/or"
        raise ValueError(f"{ast.unparse(node)!r} is not allowed in {self.source!r} (only {allowed})")

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """The value with ``values`` bound to names.

        Raises:
            KeyError: a name has no value (e.g. an inactive conditional parameter).
            ValueError: arithmetic failed (division by zero, an exponent over 64).
        """
        try:
            return self._eval(self._tree, values)
        except (ZeroDivisionError, OverflowError, TypeError) as e:
            raise ValueError(f"{self.source!r}: {e}") from None

    def _eval(self, node: ast.AST, values: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, values), self._eval(node.right, values)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"{self.source!r}: exponent {right} is over {MAX_EXPONENT}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, values))
        if isinstance(node, ast.Call):
            return _FUNCTIONS[node.func.id](*(self._eval(a, values) for a in node.args))
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
