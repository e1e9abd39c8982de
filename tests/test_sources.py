"""Source specs, camera ids, and the folder/file sources on real files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from services.capture.sources import SourceOptions, open_source
from shared.constants import is_valid_camera_id
from shared.sources import SourceError, parse_source, slugify
from tests.helpers.media import write_video


def test_webcam_specs() -> None:
    for text in ("0", "webcam:0"):
        spec = parse_source(text)
        assert (spec.kind, spec.target, spec.default_camera_id) == ("webcam", "0", "webcam0")
        assert spec.is_live
    assert parse_source("webcam:2").target == "2"


def test_stream_specs_hide_credentials() -> None:
    spec = parse_source("rtsp://admin:secret@10.0.0.5:554/Streaming/Channels/101")
    assert spec.kind == "stream" and spec.is_live
    assert "secret" not in spec.default_camera_id and is_valid_camera_id(spec.default_camera_id)
    assert "secret" not in spec.redacted() and "***" in spec.redacted()
    assert parse_source("https://example.com/cam.mjpg").kind == "stream"


def test_file_and_folder_specs(tmp_path: Path) -> None:
    video = tmp_path / "Front Door.mp4"
    video.write_bytes(b"x")
    assert parse_source(str(video)).kind == "file"
    assert parse_source(str(video)).default_camera_id == "front-door"
    assert parse_source(str(tmp_path)).kind == "folder"


@pytest.mark.parametrize("bad", ["", "   ", "/no/such/file.mp4", "webcam:x", "ftp://host/x"])
def test_bad_specs_are_clear_errors(bad: str) -> None:
    with pytest.raises(SourceError):
        parse_source(bad)


def test_slugs_are_valid_ids() -> None:
    for text in ("Ünïcödé cam", "___", "..", "A" * 100, "-x-"):
        assert is_valid_camera_id(slugify(text))


def test_folder_source_skips_unreadable_images(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((40, 60, 3), 200, np.uint8))
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    cv2.imwrite(str(tmp_path / "c.png"), np.full((30, 50, 3), 10, np.uint8))
    source = open_source(parse_source(str(tmp_path)), SourceOptions(fps=15, slide_seconds=0.05))
    seen = set()
    while (image := source.read()) is not None:
        seen.add(image.shape)
    assert seen == {(40, 60, 3), (30, 50, 3)}


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images"):
        open_source(parse_source(str(tmp_path)), SourceOptions(fps=15))


def test_video_file_source_reads_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.avi", frames=10, fps=30)
    source = open_source(parse_source(str(path)), SourceOptions(fps=30))
    frames = 0
    while source.read() is not None:
        frames += 1
    source.close()
    assert 1 <= frames <= 10


def test_corrupt_video_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00" * 1000)
    with pytest.raises(SourceError, match="cannot open"):
        open_source(parse_source(str(path)), SourceOptions(fps=15, open_timeout_s=2))
