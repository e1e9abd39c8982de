"""The images' requirements: pinned within the project's ranges (torch only where needed), installed
exactly and offline by docker/install.py from what the site image holds, and locked for every Python
3.11 base image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.helpers.deploy import REQUIREMENTS, clean_env, load_script
from tests.helpers.paths import REPO


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


def test_the_install_step_takes_its_sources_from_the_site_image(tmp_path: Path) -> None:
    """docker/install.py builds the pip command from what the site image holds (nothing by default)."""
    install = load_script("install")
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
    env = {**clean_env(tmp_path, {}), "GENDERLENS_BUILD_DIR": str(build)}
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
    lock = load_script("lock")
    assert lock.PYTHON_VERSION == "3.11.0"
    wanted = tmp_path / "redis.in"
    wanted.write_text("redis==7.4.1\n")
    assert "async-timeout" in lock.pins_of(lock.resolve(wanted, (), {}))
