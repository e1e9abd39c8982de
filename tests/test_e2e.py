"""End to end on real parts: a clip of real face photos -> `genderlens capture` -> Redis 7 ->
`genderlens infer` -> `genderlens view`, all real processes.

Ground truth for "the box is where the face is": each photo's face found by the reference detector
(cv2 YuNet) on the original photo, mapped into the composed frame. The frame a result belongs to is
read back from the frames stream by its id and matched to the composed frame it shows, so the check
does not depend on which frames the capture's real-time pacing happened to publish.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import redis

from services.inference.pipeline import decode_jpeg
from shared import constants as C
from shared.detectors import DetectorConfig, create
from shared.schema import Frame, Result
from tests.helpers.artifacts import make_artifact
from tests.helpers.net import free_port
from tests.helpers.photos import compose_frame, face_photos, iou, write_clip
from tests.helpers.processes import genderlens, stop
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

FRAMES_PER_PHOTO = 15


def test_capture_worker_viewer_end_to_end(
    tmp_path: Path, eval_dir: Path, weights_dir: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    detector = create("cv2-yunet", DetectorConfig(weights_dir=weights_dir))
    photos, truths, composed = [], [], []
    for photo in face_photos(eval_dir, 16):
        found = detector.detect([cv2.imread(str(photo))])[0]
        if len(found) == 1:  # one clear face: an unambiguous ground truth
            frame, placed = compose_frame(photo)
            photos.append(photo)
            truths.append(placed.to_frame(found.boxes[0].tolist()))
            composed.append(frame.astype(np.int16))
        if len(photos) == 4:
            break
    assert len(photos) == 4
    clip = tmp_path / "faces.avi"
    write_clip(clip, photos, FRAMES_PER_PHOTO)
    models_dir = tmp_path / "models"
    meta = make_artifact(models_dir, name="e2etest")

    port = free_port()
    env = {
        "GENDERLENS_REDIS_URL": redis_url,
        "GENDERLENS_WEIGHTS_DIR": str(weights_dir),
        "GENDERLENS_MODELS_DIR": str(models_dir),
        "GENDERLENS_PORT": str(port),
    }
    logs = tmp_path / "logs.txt"
    procs = [
        genderlens("view", env=env, log=logs),
        genderlens("infer", env=env, log=logs),
        genderlens(
            "capture", "--source", str(clip), "--camera-id", "e2e", "--fps", "15", "--loop", env=env, log=logs
        ),
    ]
    try:
        results_key = C.results_stream("e2e")
        wait_until(lambda: redis_client.xlen(results_key) >= 40, 90, "40 results")
        entries = redis_client.xrange(results_key)
        results = [Result.from_fields(fields) for _, fields in entries]
        assert {r.model.version for r in results if r.model} == {meta.version}

        # Every result: the face of the photo its frame shows, in the right place.
        checked = 0
        for result in results:
            frame_entries = redis_client.xrange(C.frames_stream("e2e"), result.frame_id, result.frame_id)
            if not frame_entries:
                continue  # trimmed from the capped stream already
            frame = Frame.from_fields(frame_entries[0][1])
            assert frame.seq == result.seq
            pixels = decode_jpeg(frame.jpeg).astype(np.int16)
            shown = int(np.argmin([np.abs(pixels - c).mean() for c in composed]))
            assert len(result.faces) >= 1, f"no face found in frame {result.seq}"
            best = max(iou(face.box, truths[shown]) for face in result.faces)
            assert best >= 0.7, f"frame {result.seq}: best IoU {best:.2f} with the known face"
            for face in result.faces:
                assert face.label in ("female", "male")
                assert sum(face.probs.values()) == pytest.approx(1.0, abs=1e-4)
            checked += 1
        # Frames trimmed from the capped stream before this check cannot be matched; under load that
        # can be most of them, so a handful of fully checked frames is the bar.
        assert checked >= 10

        base = f"http://127.0.0.1:{port}"
        cameras = wait_until(lambda: httpx.get(f"{base}/api/cameras", timeout=5).json(), 30, "/api/cameras")
        camera = next(c for c in cameras if c["id"] == "e2e")
        assert {"id", "source", "fps", "last_frame_age_ms", "faces"} <= camera.keys()
        assert camera["last_frame_age_ms"] < 5000
        latest = httpx.get(f"{base}/api/cameras/e2e/latest", timeout=5).json()
        assert {"seq", "faces"} <= latest.keys()
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200

        # The MJPEG stream yields valid JPEG frames: the camera's annotated 640x480 frames (after,
        # possibly, a "waiting" placeholder while the viewer's reader catches up).
        jpegs: list[bytes] = []
        real = 0
        with httpx.stream("GET", f"{base}/cameras/e2e/stream.mjpg", timeout=10) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("multipart/x-mixed-replace")
            buf = b""
            for chunk in resp.iter_bytes():
                buf += chunk
                while (start := buf.find(b"\xff\xd8")) >= 0 and (end := buf.find(b"\xff\xd9", start)) >= 0:
                    image = cv2.imdecode(np.frombuffer(buf[start : end + 2], np.uint8), cv2.IMREAD_COLOR)
                    assert image is not None, "the stream sent an undecodable JPEG"
                    jpegs.append(buf[start : end + 2])
                    real += image.shape[:2] == (480, 640)
                    buf = buf[end + 2 :]
                if real >= 3 or len(jpegs) >= 200:
                    break
        assert real >= 3, f"{len(jpegs)} JPEGs, {real} of them camera frames"
    finally:
        codes = [stop(p) for p in reversed(procs)]
    assert codes == [0, 0, 0], logs.read_text()[-3000:]
