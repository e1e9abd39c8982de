"""Sources from the network (issue 11, items 6 and 8): the viewer's POST /api/cameras checks a source
before anything acts on it, restricts files to the allowed folders without telling whether a path
outside exists, and never lets a URL's password reach Redis, the API or a log in the clear.

Real parts: the viewer app with its lifespan (``TestClient``) on the test Redis (database 6), real
video files and images made with OpenCV, real symlinks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.viewer.app import create_app
from services.viewer.settings import ViewerSettings
from shared import constants as C
from shared.credentials import CredentialsError, new_key, redact_url, seal, unseal
from shared.schema import CameraRequest
from shared.sources import (
    SourceError,
    SourceNotAllowedError,
    check_source,
    parse_source,
)
from tests.helpers.media import write_video
from tests.helpers.redis_servers import flushed_db, redis_url_for_db
from tests.helpers.viewer import viewer_settings

REDIS_URL = redis_url_for_db(6)
PASSWORD = "Pa55-w0rd@x"  # an "@" inside: the masking must not stop at the first one


# -- redaction -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("rtsp://admin:secret@10.0.0.5:554/Streaming/1", "rtsp://admin:***@10.0.0.5:554/Streaming/1"),
        (f"rtsp://admin:{PASSWORD}@cam.local/s", "rtsp://admin:***@cam.local/s"),
        ("rtsp://admin:pa/ss@cam/s", "rtsp://admin:***@cam/s"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rtsp://tokenonly@cam/s", "rtsp://***@cam/s"),
        (
            "http://cam/video.cgi?user=admin&pwd=hunter2&res=1",
            "http://cam/video.cgi?user=admin&pwd=***&res=1",
        ),
        ("opening 'rtsp://u:hunter2@h/x' failed", "opening 'rtsp://u:***@h/x' failed"),
        ("rtsp://cam.local/s", "rtsp://cam.local/s"),
        ("/home/me/v.mp4", "/home/me/v.mp4"),
        ("webcam:0", "webcam:0"),
    ],
)
def test_redact_url_masks_every_password(text: str, shown: str) -> None:
    assert redact_url(text) == shown


def test_sealed_sources_open_only_with_their_key() -> None:
    key, other = new_key(), new_key()
    assert key and other
    token = seal(f"rtsp://admin:{PASSWORD}@cam/s", key)
    assert PASSWORD not in token
    assert unseal(token, key) == f"rtsp://admin:{PASSWORD}@cam/s"
    with pytest.raises(CredentialsError):
        unseal(token, other)
    with pytest.raises(CredentialsError):
        unseal(token[:-4] + "AAAA", key)


# -- parsing with allowed folders ----------------------------------------------------------------
@pytest.fixture
def media(tmp_path: Path) -> Path:
    """An allowed folder with a video, a folder of images, an empty folder, a text file disguised as a
    video and a symlink pointing out of it."""
    root = tmp_path / "media"
    (root / "slides").mkdir(parents=True)
    write_video(root / "door.avi")
    cv2.imwrite(str(root / "slides" / "a.jpg"), np.full((40, 60, 3), 128, np.uint8))
    (root / "empty").mkdir()
    (root / "notes.mp4").write_text("not a video\n")
    (root / "passwd.mp4").symlink_to("/etc/passwd")
    (root / "outside").symlink_to("/etc")
    return root


def test_files_outside_the_allowed_folders_are_refused_alike(media: Path) -> None:
    allowed = [media]
    for path in (
        "/etc/passwd",
        "/etc/no-such-file",
        str(media / "passwd.mp4"),
        str(media / "outside" / "hosts"),
    ):
        with pytest.raises(SourceNotAllowedError) as exc:
            parse_source(path, allowed_dirs=allowed)
        assert path not in str(exc.value)
    # Lexical refusals: nothing is looked up for these
    for path in (f"{media}/../media/door.avi", "door.avi", "~/x.mp4"):
        with pytest.raises(SourceError):
            parse_source(path, allowed_dirs=allowed)
    spec = parse_source(str(media / "door.avi"), allowed_dirs=allowed)
    assert (spec.kind, spec.target) == ("file", str(media.resolve() / "door.avi"))
    # Command-line sources (allowed_dirs=None) are the user's own: not restricted
    assert parse_source("/etc").kind == "folder"


def test_check_source_looks_at_what_is_there(media: Path) -> None:
    check_source(parse_source(str(media / "door.avi")))
    check_source(parse_source(str(media / "slides")))
    check_source(parse_source("rtsp://cam.local/stream"))  # never connected to
    for bad, why in (
        (str(media / "empty"), "no readable images"),
        (str(media / "notes.mp4"), "cannot read a video frame"),
        ("webcam:63", "no webcam 63"),
    ):
        with pytest.raises(SourceError, match=why):
            check_source(parse_source(bad))
    txt = media / "readme.txt"
    txt.write_text("x")
    with pytest.raises(SourceError, match="not a video file"):
        check_source(parse_source(str(txt)))


# -- the viewer API ------------------------------------------------------------------------------
@pytest.fixture
def rdb() -> Iterator[redis.Redis]:
    """This module's database (6) of the test Redis, flushed before and after."""
    with flushed_db(REDIS_URL) as client:
        yield client


def viewer(media: Path, **overrides: Any) -> TestClient:
    base: dict[str, Any] = {"source_dirs": [media], "camera_request_key": SecretStr(new_key() or "")}
    return TestClient(create_app(viewer_settings(REDIS_URL, **{**base, **overrides})))


def requests_in(rdb: redis.Redis) -> list[CameraRequest]:
    return [CameraRequest.from_fields(fields) for _, fields in rdb.xrange(C.CAMERA_REQUESTS_STREAM)]


def test_api_refuses_files_outside_without_telling_whether_they_exist(rdb: redis.Redis, media: Path) -> None:
    with viewer(media) as client:
        answers = []
        for path in ("/etc/passwd", "/etc/does-not-exist", str(media / "passwd.mp4"), str(media / "outside")):
            r = client.post("/api/cameras", json={"source": path, "camera_id": "x"})
            assert r.status_code == 403, r.text
            answers.append(r.json())
        assert all(a == answers[0] for a in answers), answers  # the same words for every one
        assert "GENDERLENS_SOURCE_DIRS" in answers[0]["detail"]
        assert requests_in(rdb) == []


def test_api_accepts_only_sources_capture_can_play(rdb: redis.Redis, media: Path) -> None:
    with viewer(media) as client:
        for source, status, why in (
            (str(media / "empty"), 422, "no readable images"),
            (str(media / "notes.mp4"), 422, "cannot read a video frame"),
            (str(media / "missing.mp4"), 422, "no such file"),
            ("ftp://cam.local/x", 422, "unsupported scheme"),
            ("file:///etc/passwd", 422, "unsupported scheme"),
            ("webcam:63", 422, "no webcam 63"),
            ("relative/clip.mp4", 422, "absolute path"),
        ):
            r = client.post("/api/cameras", json={"source": source})
            assert r.status_code == status, (source, r.text)
            assert why in r.json()["detail"], (source, r.text)
        assert requests_in(rdb) == []
        accepted = {}
        for source, camera_id in (
            (str(media / "door.avi"), "door"),
            (str(media / "slides"), "slides"),
            ("rtsp://cam.local:8554/live", "cam-local-8554-live"),
        ):
            r = client.post("/api/cameras", json={"source": source})
            assert r.status_code == 202, (source, r.text)
            assert r.json()["camera_id"] == camera_id
            accepted[camera_id] = source
    requests = {r.camera_id: r for r in requests_in(rdb)}
    assert requests["door"].source == str(media.resolve() / "door.avi")  # the checked, resolved path
    assert requests["slides"].source == str(media.resolve() / "slides")
    assert requests["cam-local-8554-live"].source == accepted["cam-local-8554-live"]
    assert all(r.sealed == "" for r in requests.values())  # nothing secret in these


def test_api_never_lets_a_password_out(
    rdb: redis.Redis, media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    assert key
    source = f"rtsp://admin:{PASSWORD}@cam.local:554/live"
    caplog.set_level(logging.DEBUG)
    with viewer(media, camera_request_key=SecretStr(key)) as client:
        r = client.post("/api/cameras", json={"source": source, "camera_id": "gate"})
        assert r.status_code == 202, r.text
        assert PASSWORD not in r.text
        cameras = client.get("/api/cameras")
        assert PASSWORD not in cameras.text
    raw = b"".join(v for _, fields in rdb.xrange(C.CAMERA_REQUESTS_STREAM) for v in fields.values())
    assert PASSWORD.encode() not in raw and b"hunter" not in raw
    [request] = requests_in(rdb)
    assert request.source == "rtsp://admin:***@cam.local:554/live"
    assert unseal(request.sealed, key) == source  # only `up`, holding the key, can open it
    assert PASSWORD not in caplog.text
    # A viewer without the key (not started by `up`) refuses such a source instead of leaking it.
    rdb.flushdb()
    with viewer(media, camera_request_key=None) as client:
        r = client.post("/api/cameras", json={"source": source, "camera_id": "gate"})
        assert r.status_code == 422 and "genderlens up" in r.json()["detail"]
        assert PASSWORD not in r.text
    assert requests_in(rdb) == []


def test_default_allowed_folder_is_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GENDERLENS_SOURCE_DIRS", raising=False)
    assert ViewerSettings().source_dirs == [Path(os.path.realpath(Path.home()))]
    monkeypatch.setenv("GENDERLENS_SOURCE_DIRS", f"{tmp_path}{os.pathsep}/srv/videos")
    assert ViewerSettings().source_dirs == [tmp_path.resolve(), Path("/srv/videos")]
    monkeypatch.setenv("GENDERLENS_SOURCE_DIRS", "")
    assert ViewerSettings().source_dirs == []
