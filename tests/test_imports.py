"""No service package imports another (issue #13): what two services share lives in ``shared/``.

The viewer and ``genderlens up`` imported ``services.capture`` for source specs; those are now
``shared/sources.py``. Checked on the source (every import, at module level or inside a function),
and by importing each service's entry module and looking at what it loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Process-level entry points: they start the services, so they may import them.
ENTRY_POINTS = ("services/up.py", "services/cli.py", "services/models_cli.py", "services/__main__.py")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def test_no_service_package_imports_another_and_shared_imports_none() -> None:
    found = []
    for path in sorted((REPO / "services").rglob("*.py")) + sorted((REPO / "shared").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in ENTRY_POINTS:
            continue
        own = rel.split("/")[1] if rel.startswith("services/") else None
        for line, module in imported_modules(path):
            parts = module.split(".")
            if (
                (rel.startswith("shared/") and parts[0] in ("services", "trainer", "tools"))
                or (parts[0] == "services" and len(parts) > 1 and parts[1] != own)
                or (own is not None and parts[0] in ("trainer", "tools"))
            ):
                found.append(f"{rel}:{line} imports {module}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", ["services.viewer.app", "services.capture.service", "services.up"])
def test_a_service_loads_no_other_service(module: str) -> None:
    """``up`` imports the services' settings loaders only when it checks its children's settings."""
    own = module.split(".")[1]
    code = (
        f"import sys, {module}; "
        "print(' '.join(m for m in sys.modules if m.startswith('services.') or m == 'torch'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    others = [m for m in loaded if m.startswith("services.") and not m.startswith(f"services.{own}")]
    assert not others, f"{module} loads {others}"
    assert "torch" not in loaded, f"{module} loads torch"
