"""The labels beside the model's own classes (``uncertain``, ``unknown``, ``no model``) have one home,
``shared/constants.py``, which loads no torch: the viewer, the workers and the model format share it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABELS = {"uncertain", "unknown", "no model", "no_model"}


def test_the_labels_are_defined_once_in_shared_constants() -> None:
    from shared import constants as C

    assert {C.UNCERTAIN, C.UNKNOWN, C.NO_MODEL, C.NO_MODEL_COUNT} == LABELS
    found = []
    for path in sorted(p for pkg in ("shared", "services", "tools") for p in (REPO / pkg).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # a module-level name bound to one of the labels, or a label compared literally
            value = getattr(node, "value", None)
            if (
                isinstance(node, ast.Assign | ast.AnnAssign)
                and isinstance(value, ast.Constant)
                and value.value in LABELS
                and rel != "shared/constants.py"
            ):
                found.append(f"{rel}:{node.lineno} defines {value.value!r}")
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    elts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                    for elt in elts:
                        if isinstance(elt, ast.Constant) and elt.value in LABELS:
                            found.append(f"{rel}:{node.lineno} compares with {elt.value!r}")
    assert not found, "\n".join(found)


def test_the_labels_load_no_torch() -> None:
    code = "import sys, shared.constants, services.viewer.tracker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
