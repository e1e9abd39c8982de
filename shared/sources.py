"""Source specs: the contract between the three services that handle a camera source, so it lives
here and none of them imports another.

``genderlens up`` (its ``--source`` flags and the camera requests it acts on), the viewer's
``POST /api/cameras`` and ``genderlens capture`` all read a spec with :func:`parse_source`:

- ``0`` / ``webcam:0``: a V4L2 device;
- ``rtsp://``, ``rtsps://``, ``rtmp://``, ``http://``, ``https://``: a network stream;
- a path: a video file, or a folder of images (a slideshow).

A spec that arrives over the network (the viewer API, a request in Redis) is parsed with
``allowed_dirs``: a file or folder must then lie inside one of those folders once symlinks and ``..``
are resolved, and that is checked before anything else is said about the path, so a refusal tells
nothing about whether a path outside exists. :func:`check_source` then looks at what is there (a video
OpenCV can read a frame from, a folder holding an image, a webcam device that exists) without
connecting to any network stream.

Only the standard library, pydantic and ``shared`` at import: OpenCV is imported by the probes
themselves, so the viewer and ``up`` pay for it only when they check a file or folder. URL
credentials are masked with ``shared.credentials.redact_url``, the one redaction function. Capture's
frame sources (the backends that open a spec) are in ``services/capture/sources.py``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final

from pydantic import AfterValidator, BeforeValidator
from pydantic_settings import NoDecode

from shared.constants import is_valid_camera_id
from shared.credentials import redact_url

STREAM_SCHEMES: Final = ("rtsp", "rtsps", "rtmp", "http", "https")
IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
#: File sources accepted from the network: video containers (and single images) by their suffix, so
#: that FFmpeg is never asked to interpret a playlist or any other file that names further files.
VIDEO_SUFFIXES: Final = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts"}
    | {".wmv", ".flv", ".3gp", ".ogv", ".mjpeg", ".mjpg", ".gif"}
)
#: A folder is searched this far (entries looked at) for an image, so that a huge tree costs little.
MAX_FOLDER_SCAN: Final = 5000


class SourceError(RuntimeError):
    """A source that cannot be used; the message names the spec (credentials masked) and what to do."""


class SourceNotAllowedError(SourceError):
    """A file or folder outside the allowed folders (the API answers 403)."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  #: registry key: webcam | file | stream | folder
    target: str  #: device index, path (absolute once checked against allowed folders) or URL
    spec: str  #: what the user typed

    @property
    def default_camera_id(self) -> str:
        if self.kind == "webcam":
            return f"webcam{self.target}"
        if self.kind == "stream":
            text = re.sub(r"^[a-z]+://", "", self.target, flags=re.IGNORECASE)
            text = text.rpartition("@")[2]  # never put credentials into an id
        else:
            text = Path(self.target).stem if self.kind == "file" else Path(self.target).name
        return slugify(text)

    @property
    def is_live(self) -> bool:
        return self.kind in ("webcam", "stream")

    @property
    def has_credentials(self) -> bool:
        return self.kind == "stream" and redact_url(self.target) != self.target

    def redacted(self) -> str:
        """The spec with any URL credentials masked, for logs, the camera registry and the API."""
        return redact_url(self.spec)


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:63] or "camera"
    if not slug[0].isalnum():
        slug = "c" + slug[:62]
    assert is_valid_camera_id(slug), slug
    return slug


def parse_source(spec: str, allowed_dirs: Sequence[Path] | None = None) -> SourceSpec:
    """Parse a spec. ``allowed_dirs`` (sources from the network): files and folders must be absolute
    paths inside one of these (resolved) folders, and the spec's target becomes the resolved path."""
    text = spec.strip()
    if not text:
        raise SourceError("empty source")
    if re.fullmatch(r"\d+", text):
        return SourceSpec("webcam", str(int(text)), spec)
    match = re.fullmatch(r"webcam:(\d+)", text)
    if match:
        return SourceSpec("webcam", str(int(match.group(1))), spec)
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", text, re.IGNORECASE)
    if scheme:
        if scheme.group(1).lower() not in STREAM_SCHEMES:
            raise SourceError(
                f"source {redact_url(text)!r}: unsupported scheme {scheme.group(1)!r}; "
                f"use one of {', '.join(s + '://' for s in STREAM_SCHEMES)}"
            )
        if not urllib.parse.urlsplit(text).hostname or re.search(r"\s", text):
            raise SourceError(f"source {redact_url(text)!r}: not a valid URL (no host, or spaces)")
        return SourceSpec("stream", text, spec)
    path = Path(text).expanduser()
    if allowed_dirs is not None:
        path = _inside(path, allowed_dirs)
    if path.is_dir():
        return SourceSpec("folder", str(path), spec)
    if path.is_file():
        return SourceSpec("file", str(path), spec)
    if allowed_dirs is not None:
        raise SourceError(f"no such file or folder: {text!r}")
    raise SourceError(
        f"source {text!r}: not a webcam index (0, webcam:0), an rtsp:// or http(s):// URL, "
        "an existing video file or an existing folder of images"
    )


def _inside(path: Path, allowed_dirs: Sequence[Path]) -> Path:
    """``path`` resolved (symlinks, ``..``), if it lies in one of ``allowed_dirs``; else refused with
    the same words whether or not it exists."""
    if not path.is_absolute():
        raise SourceError("a file or folder source must be an absolute path")
    if ".." in path.parts:
        raise SourceError("a file or folder source must not contain '..'")
    real = Path(os.path.realpath(path))
    if not any(real == d or real.is_relative_to(d) for d in allowed_dirs):
        raise SourceNotAllowedError(
            "file and folder sources are only accepted inside the allowed folders (GENDERLENS_SOURCE_DIRS)"
        )
    return real


def check_source(spec: SourceSpec, open_timeout_s: float = 10.0) -> None:
    """Look at what a spec points to, without connecting to a network stream: a webcam device that
    exists (Linux), a folder holding at least one image OpenCV can read, or a video file (by its
    suffix) OpenCV can read a frame from. Raises :class:`SourceError` saying what is wrong."""
    if spec.kind == "webcam":
        if sys.platform.startswith("linux") and not Path(f"/dev/video{spec.target}").exists():
            raise SourceError(f"no webcam {spec.target} on this machine (/dev/video{spec.target} is missing)")
    elif spec.kind == "folder":
        if _first_image(Path(spec.target)) is None:
            raise SourceError(
                f"folder {spec.spec!r} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
    elif spec.kind == "file":
        _probe_video(spec, open_timeout_s)


def _first_image(root: Path) -> Path | None:
    import cv2

    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            seen += 1
            if seen > MAX_FOLDER_SCAN:
                return None
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and cv2.haveImageReader(str(path)):
                return path
    return None


def _probe_video(spec: SourceSpec, open_timeout_s: float) -> None:
    import cv2

    path = Path(spec.target)
    if path.suffix.lower() not in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
        raise SourceError(
            f"{spec.spec!r} is not a video file (expected one of {', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000)]
    cap = cv2.VideoCapture(str(path), cv2.CAP_ANY, params)
    try:
        ok = cap.isOpened() and cap.read()[0]
    finally:
        cap.release()
    if not ok:
        raise SourceError(f"cannot read a video frame from {spec.spec!r}: not a video OpenCV can decode")


# -- the setting that restricts file sources from the network ------------------------------------
def _split_dirs(value: object) -> object:
    """``GENDERLENS_SOURCE_DIRS``: folders separated by ``os.pathsep`` (like PATH), or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part for part in text.split(os.pathsep) if part.strip()]
    return value


def _resolve_dirs(dirs: list[Path]) -> list[Path]:
    return [Path(os.path.realpath(d.expanduser())) for d in dirs]


def default_source_dirs() -> list[Path]:
    """The user's home folder: a local tool plays the user's own videos; system files stay out."""
    return [Path(os.path.realpath(Path.home()))]


#: A settings field type: a list of folders, resolved (symlinks followed) when the settings load.
SourceDirs = Annotated[list[Path], NoDecode, BeforeValidator(_split_dirs), AfterValidator(_resolve_dirs)]

SOURCE_DIRS_HELP: Final = (
    "Folders that file and folder sources added through the viewer API must lie in (os.pathsep-"
    "separated, or a JSON list; empty = no file sources through the API). Default: your home folder. "
    "Sources given on the command line are not restricted."
)
