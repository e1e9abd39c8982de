"""Where things are: the checkout, and ``../shared`` (the face photos and detector weights handed over
beside it). This module is the one place in the tests that knows where ``../shared`` is: fixtures
(``tests/conftest.py``) and helpers take their paths from here. A module-level ``skipif`` needs the
path at import, before any fixture runs, which is why the constant is not inside conftest itself.

Where ``../shared`` is absent (a fresh machine) the tests that need it skip with a reason; in CI
(GENDERLENS_REQUIRE_SHARED=1) conftest turns those skips into failures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
EVAL_DIR = SHARED / "data" / "faces" / "eval"
TRAIN_DIR = SHARED / "data" / "faces" / "train"
WEIGHTS_DIR = SHARED / "weights" / "yunet"
#: What most tests need: the eval photos and the YuNet weights.
DEFAULT_NEEDS = (EVAL_DIR, WEIGHTS_DIR)


def shared_missing(*paths: Path) -> list[Path]:
    """Those of ``paths`` (under ``SHARED``; default: the eval photos and YuNet weights) not here."""
    return [path for path in paths or DEFAULT_NEEDS if not path.exists()]


def _reason(missing: list[Path]) -> str:
    names = ", ".join(str(path.relative_to(SHARED)) for path in missing)
    return f"needs {names} in {SHARED} (../shared: present on developer machines and in CI)"


def skip_without(*paths: Path) -> pytest.MarkDecorator:
    """A ``skipif`` mark for tests that read ``paths`` from ../shared."""
    missing = shared_missing(*paths)
    return pytest.mark.skipif(bool(missing), reason=_reason(missing))


def require_shared(*paths: Path) -> None:
    """Skip the running test (or fixture) where any of ``paths`` is missing from ../shared."""
    missing = shared_missing(*paths)
    if missing:
        pytest.skip(_reason(missing))
