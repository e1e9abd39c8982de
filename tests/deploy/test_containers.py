"""The command each container runs is the local mode's ``genderlens`` entry point, and it starts: the
containers' commands, with their compose environment, run here as local processes against the test
Redis (database 15).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.deploy import TOKEN, clean_env, dockerfile_stages, env_of
from tests.helpers.media import write_video
from tests.helpers.net import free_port, http_status
from tests.helpers.paths import REPO, require_shared

#: The YuNet weights handed over beside the checkout (the image bakes the same files in).
from tests.helpers.paths import WEIGHTS_DIR as SHARED_WEIGHTS
from tests.helpers.redis_servers import flushed_db, redis_url_for_db
from tests.helpers.waiting import wait_until

TEST_REDIS_URL = redis_url_for_db(15)
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
    env = clean_env(tmp, {})
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


@pytest.fixture()
def test_redis() -> Iterator[Any]:
    """This module's database (15) of the test Redis, flushed before and after."""
    with flushed_db(TEST_REDIS_URL) as client:
        yield client


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_container_commands_start_as_local_processes(
    base: dict[str, Any], test_redis: Any, tmp_path: Path
) -> None:
    """capture (a generated video file instead of the webcam), an inference worker and the viewer, each
    started with its container's command and compose environment from this venv's bin/, against the
    test Redis: they run, frames flow through the worker, the healthchecks pass, SIGTERM stops them."""
    require_shared(SHARED_WEIGHTS)
    from shared import constants as C

    video = tmp_path / "compose-clip.avi"
    write_video(video, frames=60, size=(320, 240), fps=15)
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
        wait_until(
            lambda: test_redis.xlen(C.frames_stream("compose-clip")) > 0,
            60,
            "frames",
            interval=0.5,
            procs=procs,
        )
        wait_until(
            lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200,
            60,
            "viewer /healthz",
            interval=0.5,
            procs=procs,
        )
        wait_until(
            lambda: int(test_redis.hget(stats, C.STAT_PROCESSED) or 0) > 0,
            150,
            "processed frames",
            interval=0.5,
            procs=procs,
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
