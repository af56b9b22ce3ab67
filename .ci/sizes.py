"""The size limits of hpo/: no module over 400 lines, no function over 80 (its def line through its last line).

ruff's PLR0915 and C901 count statements and branches, not lines; this counts what a reader scrolls through.
Run by ``make lint``; prints each module or function over its limit and exits 1.
"""

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def oversized(root: Path) -> list[str]:
    """``FILE: ...`` for each module of ``root`` over :data:`MAX_MODULE_LINES` lines and each function (nested
    ones too, methods too) over :data:`MAX_FUNCTION_LINES`."""
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            out.append(f"{path}: {n} lines (at most {MAX_MODULE_LINES} a module)")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # the def line, not its decorators
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path}:{node.lineno}: {node.name} has {n} lines (at most {MAX_FUNCTION_LINES})")
    return out


if __name__ == "__main__":
    found = oversized(Path(sys.argv[1] if len(sys.argv) > 1 else "hpo"))
    print("\n".join(found) or "sizes: ok", file=sys.stderr if found else sys.stdout)
    sys.exit(1 if found else 0)
