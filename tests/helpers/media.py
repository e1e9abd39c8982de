"""Synthetic pictures and videos (no faces): for tests that need valid or deliberately broken media,
not people."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def flat_jpeg(width: int = 64, height: int = 48, shade: int = 0) -> bytes:
    """A real JPEG: a ``shade`` grey picture whose left half is orange."""
    image = np.full((height, width, 3), shade, np.uint8)
    image[:, : width // 2] = (40, 120, 200)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def bomb(width: int, height: int) -> bytes:
    """A real (tiny) JPEG whose frame header is rewritten to declare ``width`` x ``height``: what a
    decoder allocates for, though the file is a few hundred bytes."""
    data = bytearray(flat_jpeg(64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def write_video(path: Path, frames: int = 5, size: tuple[int, int] = (64, 48), fps: float = 10) -> Path:
    """An MJPG .avi of ``frames`` frames: a grey that lightens, with a red disc that grows."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "cv2 cannot write MJPG/AVI here"
    for i in range(frames):
        frame = np.full((height, width, 3), (40 + i) % 256, np.uint8)
        cv2.circle(frame, (width // 2, height // 2), min(width, height) // 8 + i % 40, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    assert path.stat().st_size > 0
    return path
