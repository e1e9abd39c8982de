"""Install one image's pinned requirements into the image's virtualenv (image build step).

    python /build/install.py STEM [WHEEL...]

STEM names ``docker/requirements/STEM.txt`` (e.g. ``capture``, ``inference-cpu``); WHEELs are local
wheel files installed with it (the project's own wheel). Every package is installed at its pinned
version with ``--no-deps`` (what runs is what was tested), then ``pip check`` verifies the closure.

Where the packages come from is the site's choice, so that an image builds behind a mirror or with no
internet at all (docs/docker.md, "Build behind a mirror or without internet"). The Dockerfile mounts
the requirements at ``/build/requirements`` and the site image (build argument ``SITE_IMAGE``, empty
by default) at ``/build/site``:

- ``site/wheels/*.whl``: a wheelhouse; pip looks there first (``--find-links``).
- ``site/pip.conf``: pip's own configuration for the build, e.g. ``index-url`` (a PyPI mirror),
  ``trusted-host``, or ``no-index = true`` (the wheelhouse only, nothing downloaded). When it is
  there, it also decides where the CPU-only torch wheels of the ``*-cpu`` files come from;
  without it they come from the PyTorch CPU index (an extra index).
- ``site/ca-certificates.crt``: a CA bundle pip trusts (a mirror or proxy with its own CA).

Standard library only: it runs in the bare runtime stage, before anything is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BUILD = Path(os.environ.get("GENDERLENS_BUILD_DIR", "/build"))
TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"


def pip_command(stem: str, wheels: list[str], build: Path = BUILD) -> list[str]:
    requirements = build / "requirements" / f"{stem}.txt"
    if not requirements.is_file():
        known = sorted(p.stem for p in (build / "requirements").glob("*.txt"))
        raise SystemExit(f"error: no {requirements} (TORCH_FLAVOUR is cpu or gpu); known: {', '.join(known)}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps"]
    wheelhouse = build / "site" / "wheels"
    if any(wheelhouse.glob("*.whl")):
        cmd += ["--find-links", str(wheelhouse)]
    if stem.endswith("-cpu") and not (build / "site" / "pip.conf").is_file():
        cmd += ["--extra-index-url", TORCH_CPU_INDEX_URL]
    return [*cmd, "-r", str(requirements), *wheels]


def pip_environment(build: Path = BUILD) -> dict[str, str]:
    env = dict(os.environ)
    config = build / "site" / "pip.conf"
    if config.is_file():
        env["PIP_CONFIG_FILE"] = str(config)
    ca_bundle = build / "site" / "ca-certificates.crt"
    if ca_bundle.is_file():
        env["PIP_CERT"] = str(ca_bundle)
    return env


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    env = pip_environment()
    subprocess.run(pip_command(argv[0], argv[1:]), env=env, check=True)
    subprocess.run([sys.executable, "-m", "pip", "check"], env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
