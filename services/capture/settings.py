"""Capture service settings (env prefix ``GENDERLENS_``; CLI flags override)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class CaptureSettings(CommonSettings):
    source: str = Field(
        "0",
        description="Source spec: 0 / webcam:N, a video file, rtsp:// or http(s):// URL, "
        "or a folder of images. Give a URL with a password in the environment: ps shows command lines.",
    )
    camera_id: str | None = Field(None, description="Camera id (slug); derived from the source when unset.")
    fps: float = Field(
        15.0,
        gt=0,
        le=120,
        description="Frames per second to publish (the source is paced or subsampled to this).",
    )
    loop: bool = Field(False, description="Loop a video file or image folder at its end.")
    jpeg_quality: int = Field(85, ge=30, le=100, description="JPEG quality of published frames.")
    max_width: int = Field(1280, ge=64, le=8192, description="Frames wider than this are downscaled.")
    frames_maxlen: int = Field(120, ge=4, description="Cap (MAXLEN ~) of the camera's frames stream.")
    reconnect_max_s: float = Field(10.0, gt=0, description="Cap of the reconnect backoff of a lost source.")
    open_timeout_s: float = Field(10.0, gt=0, description="Give up opening a source after this long.")
    slide_seconds: float = Field(1.0, gt=0, description="How long each image of a folder source is shown.")
    publish_queue: int = Field(
        2,
        ge=1,
        le=64,
        description="Frames waiting for Redis; when full the oldest is "
        "dropped (counted), so capture never blocks on a slow Redis.",
    )
