"""Viewer settings (env prefix ``GENDERLENS_VIEWER_`` for viewer-only fields is not used: every field has
the common ``GENDERLENS_`` prefix, e.g. ``GENDERLENS_VIEWER_TOKEN``)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from services.capture.spec import SOURCE_DIRS_HELP, SourceDirs, default_source_dirs
from shared.settings import CommonSettings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ViewerSettings(CommonSettings):
    host: str = Field("127.0.0.1", description="Interface to bind. Anything but localhost needs a token.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    viewer_token: SecretStr | None = Field(
        None,
        description="When set, required on every page, stream and "
        "API call (login form sets a cookie; or Authorization: Bearer).",
    )
    blur_faces: bool = Field(
        False, description="Blur every face in the served video (detections still counted)."
    )
    uncertain_threshold: float = Field(
        0.6, ge=0, le=1, description="Smoothed confidence below which a track is labelled 'uncertain'."
    )
    stream_fps: float = Field(15.0, gt=0, le=60, description="Most MJPEG frames per second per client.")
    jpeg_quality: int = Field(80, ge=30, le=100, description="JPEG quality of the annotated stream.")
    frame_buffer: int = Field(64, ge=2, description="Recent frames kept per camera to annotate.")
    no_signal_after_s: float = Field(
        3.0, gt=0, description="A camera without frames for this long shows 'no signal'."
    )
    allow_camera_control: bool = Field(True, description="Allow POST/DELETE /api/cameras.")
    source_dirs: SourceDirs = Field(default_factory=default_source_dirs, description=SOURCE_DIRS_HELP)
    camera_request_key: SecretStr | None = Field(
        None,
        description="Set by `genderlens up` for its viewer: the key that seals the credentials of a "
        "source added through the API (rtsp://user:password@...), so they never reach Redis in the "
        "clear. Without it such sources are refused.",
    )

    @model_validator(mode="after")
    def _token_off_localhost(self) -> ViewerSettings:
        if self.host not in LOCAL_HOSTS and self.viewer_token is None:
            raise ValueError(
                f"refusing to bind the viewer to {self.host!r} without GENDERLENS_VIEWER_TOKEN: "
                "it shows live video of people; set a token or bind to 127.0.0.1"
            )
        return self
