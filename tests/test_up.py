"""`genderlens up` as a user runs it: a subprocess with a file source and its own embedded Redis.
The viewer URL answers, results flow, and SIGTERM stops every child process (no orphans)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import REPO, face_photos, free_port, wait_until, write_clip

pytestmark = pytest.mark.slow


def test_up_runs_everything_and_stops_cleanly(tmp_path: Path, eval_dir: Path, weights_dir: Path) -> None:
    clip = tmp_path / "clip.avi"
    write_clip(clip, face_photos(eval_dir, 2), frames_per_photo=15)
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--source",
                str(clip),
                "--loop",
                "--port",
                str(port),
                "--weights-dir",
                str(weights_dir),
                "--models-dir",
                str(REPO / "models"),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = wait_until(
            lambda: re.search(r"genderlens viewer: (http://\S+)", log.read_text()), 60, "the viewer URL line"
        ).group(1)
        assert url == f"http://localhost:{port}/"
        assert wait_until(lambda: httpx.get(url, timeout=5).status_code == 200, 60, "the viewer page")

        def faces_seen() -> bool:
            cams = httpx.get(f"{url}api/cameras", timeout=5).json()
            latest = httpx.get(f"{url}api/cameras/{cams[0]['id']}/latest", timeout=5)
            return latest.status_code == 200 and len(latest.json()["faces"]) > 0

        wait_until(faces_seen, 90, "results with faces through the whole system")
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for part in ("redis-server", " view", " infer", " capture"):
            assert part in names, f"{part!r} not among {names}"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-3000:]
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphans left running: {[c.cmdline() for c in alive]}"


def test_up_without_a_camera_names_the_source_flag() -> None:
    """No webcam at index 63 on any test machine: a clear message naming --source, non-zero exit, and
    nothing started (it fails before Redis or any child process)."""
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--source", "webcam:63"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no camera could be opened" in proc.stderr and "--source" in proc.stderr
    assert "genderlens viewer:" not in proc.stdout
