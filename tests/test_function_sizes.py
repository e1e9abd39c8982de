"""No function over 80 lines (a screen) in shared/, services/, trainer/ and tools/ (issue #13)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services", "trainer", "tools")
MAX_LINES = 80
#: "path:function" -> why it may be longer. None today.
EXCEPTIONS: dict[str, str] = {}


def test_no_function_is_longer_than_a_screen() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_LINES and f"{rel}:{node.name}" not in EXCEPTIONS:
                        found.append(f"{rel}:{node.lineno} {node.name} has {lines} lines")
    assert not found, "\n".join(found)
