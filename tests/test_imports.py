"""No service package imports another (issue #13): what two services share lives in ``shared/``.

The viewer and ``genderlens up`` imported ``services.capture`` for source specs; those are now
``shared/sources.py``. Checked on the source (every import, at module level or inside a function),
and by importing each service's entry module and looking at what it loaded.

The import graph between top-level packages (end of the file): ``shared/`` at the bottom, services and
the trainer on it and never on each other, the dev tools (``tools/``) on top.
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


# -- the import graph between top-level packages (issue #13) ---------------------------------------
#: What each top-level package may import of the project: ``shared/`` at the bottom, the services and
#: the trainer on it (never on each other), the dev tools on anything.
MAY_IMPORT: dict[str, set[str]] = {
    "shared": {"shared"},
    "services": {"shared", "services"},
    "trainer": {"shared", "trainer"},
    "tools": {"shared", "services", "trainer", "tools"},
}
PACKAGES = set(MAY_IMPORT)
#: Known exceptions, each with its reason. ``genderlens`` is one command (services/cli.py) whose
#: subcommands live in other packages; it imports each by name (importlib, lazily), checked below.
#: (file, top-level package) pairs allowed to break the graph, each with its reason. None today.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
#: ``genderlens SUBCOMMAND`` modules outside services/: the trainer's commands, and the one dev tool,
#: found only in a source checkout (services/cli.py's load_command; no image contains tools/).
CLI_COMMANDS_ELSEWHERE = {"train": "trainer.train", "eval": "trainer.evaluate", "bench": "tools.bench.cli"}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import of ``path`` (module level or inside a function), plus modules imported by
    name with ``importlib.import_module("...")``, as (line, module)."""
    out = imported_modules(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def graph_violations() -> list[str]:
    found = []
    for package in sorted(PACKAGES):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for line, module in project_imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top not in MAY_IMPORT[package] and (rel, top) not in KNOWN_EXCEPTIONS:
                    found.append(f"{rel}:{line} imports {module}")
    return found


def test_shared_is_at_the_bottom_and_nothing_imports_back_up() -> None:
    """shared/ imports nothing above it; services never import the trainer or the tools; the trainer
    never imports services. Checked on every import statement and every import_module("...")."""
    found = graph_violations()
    assert not found, "\n".join(found)
    for (rel, top), reason in KNOWN_EXCEPTIONS.items():  # an exception that no longer applies goes
        imports = {m.split(".")[0] for _, m in project_imports(REPO / rel)}
        assert top in imports, f"{rel} no longer imports {top}: remove its exception ({reason})"


def test_the_cli_reaches_other_packages_only_for_their_own_subcommands() -> None:
    """services/cli.py is the `genderlens` command: it imports subcommand modules by name, and only when
    that subcommand runs. Outside services/ that is the trainer's train/eval and the bench dev tool."""
    from services.cli import COMMANDS

    elsewhere = {name: module for name, (module, _) in COMMANDS.items() if not module.startswith("services.")}
    assert elsewhere == CLI_COMMANDS_ELSEWHERE
    cli = (REPO / "services" / "cli.py").read_text(encoding="utf-8")
    for module in elsewhere.values():
        assert f'"{module}"' in cli  # named in the table, imported nowhere else in the file
    assert not [m for _, m in imported_modules(REPO / "services" / "cli.py") if m.split(".")[0] in PACKAGES]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("shared", ("services", "trainer", "tools")), ("trainer", ("services", "tools"))],
)
def test_importing_a_package_loads_nothing_above_it(package: str, forbidden: tuple[str, ...]) -> None:
    """What the source says, checked on what actually loads: every module of the package imported."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    assert not loaded, f"importing {package} loads {loaded}"
