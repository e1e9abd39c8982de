"""The resolved compose configurations the deployment tests read (resolved once per session)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.deploy import BASE, GPU, resolved


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml resolved, every profile on (read-only: tests must not change it)."""
    return resolved(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="session")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml with compose.gpu.yml, resolved (read-only)."""
    return resolved(tmp_path_factory.mktemp("compose-gpu"), (BASE, GPU))
