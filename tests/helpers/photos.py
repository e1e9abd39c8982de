"""Real face photos (the eval set of ../shared) as tests use them: picked deterministically, downscaled,
pasted into frames, written as clips or folders, and the faces YuNet finds in them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers.paths import EVAL_DIR, WEIGHTS_DIR, require_shared


def face_photos(eval_dir: Path, n: int, source: str = "pixabay") -> list[Path]:
    """n real portraits, alternating female/male, spread over the set (every 7th), deterministic."""
    female = sorted((eval_dir / "female" / source).glob("*.jpg"))
    male = sorted((eval_dir / "male" / source).glob("*.jpg"))
    out: list[Path] = []
    for i in range(n):
        pool = female if i % 2 == 0 else male
        out.append(pool[(i * 7) % len(pool)])
    return out


def photo_paths(n: int, gender: str | None = None) -> list[Path]:
    """The first n head-and-shoulders portraits (Pixabay part of the eval set) of ``gender``, or of
    both in turn; the test skips where ../shared lacks them."""
    require_shared(EVAL_DIR)
    genders = [gender] if gender else ["female", "male"]
    per = [sorted((EVAL_DIR / g / "pixabay").glob("*.jpg")) for g in genders]
    out: list[Path] = []
    for i in range(max(len(p) for p in per)):
        for paths in per:
            if i < len(paths):
                out.append(paths[i])
        if len(out) >= n:
            break
    if len(out) < n:
        pytest.skip(f"need {n} photos in {EVAL_DIR}, found {len(out)}")
    return out[:n]


def fit_width(image: npt.NDArray[Any], width: int) -> npt.NDArray[np.uint8]:
    """``image`` scaled (area interpolation) to ``width`` pixels wide, aspect kept."""
    scale = width / image.shape[1]
    size = (width, round(image.shape[0] * scale))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), np.uint8)


def photo_jpeg(path: Path, width: int = 480) -> tuple[bytes, int, int]:
    """A photo downscaled to ``width`` as a JPEG, with its width and height."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    image = fit_width(image, width)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes(), image.shape[1], image.shape[0]


def make_photo_folder(target: Path, count: int = 6, width: int = 480) -> Path:
    """A folder source of real face photos, downscaled so capture and workers spend little CPU."""
    require_shared()
    target.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in EVAL_DIR.rglob("*.jpg"))[:: max(1, 200 // count)][:count]
    for i, photo in enumerate(photos):
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        assert image is not None, photo
        cv2.imwrite(str(target / f"{i:03d}.jpg"), fit_width(image, width))
    return target


@dataclass(frozen=True)
class Placed:
    """Where a photo was pasted in a frame: offset and scale (photo px -> frame px)."""

    photo: Path
    x: int
    y: int
    scale: float

    def to_frame(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        bx, by, bw, bh = box
        return (self.x + bx * self.scale, self.y + by * self.scale, bw * self.scale, bh * self.scale)


def compose_frame(
    photo: Path, size: tuple[int, int] = (640, 480), background: int = 90
) -> tuple[npt.NDArray[np.uint8], Placed]:
    """Paste a photo, scaled to fit, at the centre of a grey frame (every frame the same size)."""
    width, height = size
    image = cv2.imread(str(photo))
    assert image is not None, photo
    scale = min(width / image.shape[1], height / image.shape[0]) * 0.9
    resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    frame = np.full((height, width, 3), background, np.uint8)
    x = (width - resized.shape[1]) // 2
    y = (height - resized.shape[0]) // 2
    frame[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
    return frame, Placed(photo, x, y, scale)


def write_clip(path: Path, photos: Sequence[Path], frames_per_photo: int, fps: int = 15) -> list[Placed]:
    """An MJPG .avi in which each photo is shown for frames_per_photo frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (640, 480))
    placed = []
    for photo in photos:
        frame, where = compose_frame(photo)
        placed.append(where)
        for _ in range(frames_per_photo):
            writer.write(frame)
    writer.release()
    assert path.stat().st_size > 0
    return placed


def detect_faces(jpeg: bytes) -> list[tuple[float, float, float, float]]:
    """Real face boxes from YuNet (the same weights the workers use), for results that match a photo."""
    onnx = WEIGHTS_DIR / "face_detection_yunet_2023mar.onnx"
    require_shared(onnx)
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    detector = cv2.FaceDetectorYN.create(str(onnx), "", (image.shape[1], image.shape[0]), 0.6)
    _, faces = detector.detect(image)
    if faces is None:
        return []
    return [(float(f[0]), float(f[1]), float(f[2]), float(f[3])) for f in faces]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax, ay, aw, ah = (float(v) for v in a[:4])
    bx, by, bw, bh = (float(v) for v in b[:4])
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def sharpness(image: npt.NDArray[np.uint8]) -> float:
    """Variance of the Laplacian: high for detailed pixels, near zero once blurred."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())
