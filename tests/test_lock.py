"""docker/requirements/*.txt are what docker/lock.py (uv pip compile) makes of pyproject.toml today.

These resolve against the package index (PyPI, as CI has it; uv caches what it read)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "docker" / "requirements"


def _lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_lock", REPO / "docker" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "docker" / "lock.py"), "--check", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_requirement_files_are_current() -> None:
    done = _check(REQUIREMENTS)
    assert done.returncode == 0, done.stderr


def test_check_finds_a_file_that_is_no_longer_a_resolution_of_pyproject(tmp_path: Path) -> None:
    """A pin dropped (as when pyproject gains a dependency) or outside pyproject's range (as when a range
    moves): --check names the file and exits 1; the other files stay current."""
    out = tmp_path / "requirements"
    shutil.copytree(REQUIREMENTS, out)
    viewer = out / "viewer.txt"
    viewer.write_text(
        "".join(line + "\n" for line in viewer.read_text().splitlines() if not line.startswith("msgpack=="))
    )
    capture = out / "capture.txt"
    capture.write_text(
        "".join(
            ("redis==4.6.0" if line.startswith("redis==") else line) + "\n"
            for line in capture.read_text().splitlines()
        )
    )
    done = _check(out)
    assert done.returncode == 1
    assert done.stderr.strip() == "not current (run docker/lock.py): capture.txt, viewer.txt"


def test_the_cpu_flavour_drops_the_cuda_wheels_and_takes_the_cpu_torch() -> None:
    lock = _lock()
    gpu = "nvidia-cublas==13.1.1.3\ncuda-bindings==13.5.0\ntriton==3.8.0\ntorch==2.14.1\ntorchvision==0.29.1\nnumpy==2.4.6\n"
    assert lock.cpu_flavour(gpu) == "torch==2.14.1+cpu\ntorchvision==0.29.1+cpu\nnumpy==2.4.6\n"
    for flavour in ("inference", "trainer"):
        gpu_pins = lock.pins_of((REQUIREMENTS / f"{flavour}-gpu.txt").read_text())
        cpu_text = (REQUIREMENTS / f"{flavour}-cpu.txt").read_text()
        assert lock.pins_of(cpu_text) == lock.pins_of(lock.cpu_flavour("\n".join(gpu_pins.values())))
