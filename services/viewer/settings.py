"""Viewer settings (env prefix ``GENDERLENS_VIEWER_`` for viewer-only fields is not used: every field has
the common ``GENDERLENS_`` prefix, e.g. ``GENDERLENS_VIEWER_TOKEN``)."""

from __future__ import annotations

import contextlib
import socket

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.schema import MAX_FACES
from shared.settings import CommonSettings
from shared.sources import SOURCE_DIRS_HELP, SourceDirs, default_source_dirs

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
#: Bind addresses that mean "every interface".
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
#: Shortest accepted viewer token: it guards live video of people and keys the session cookie.
MIN_TOKEN_LENGTH = 16
#: A token must also not be trivially repetitive ("aaaaaaaaaaaaaaaa").
MIN_TOKEN_DISTINCT = 8
TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class ViewerSettings(CommonSettings):
    host: str = Field("127.0.0.1", description="Interface to bind. Anything but localhost needs a token.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    viewer_token: SecretStr | None = Field(
        None,
        description="When set, required on every page, stream and API call (login form sets a cookie; "
        f"or Authorization: Bearer). At least {MIN_TOKEN_LENGTH} characters.",
    )
    blur_faces: bool = Field(
        False, description="Blur every face in the served video (detections still counted)."
    )
    stream_fps: float = Field(15.0, gt=0, le=60, description="Most MJPEG frames per second per client.")
    jpeg_quality: int = Field(80, ge=30, le=100, description="JPEG quality of the annotated stream.")
    frame_buffer: int = Field(64, ge=2, description="Recent frames kept per camera to annotate.")
    no_signal_after_s: float = Field(
        3.0, gt=0, description="A camera without frames for this long shows 'no signal'."
    )
    allow_camera_control: bool = Field(True, description="Allow POST/DELETE /api/cameras.")
    allowed_hosts: str = Field(
        "",
        description="Comma-separated host names the viewer answers to (the Host header; '*.example.org' "
        "for subdomains, '*' for any). Always allowed: localhost, 127.0.0.1, [::1] and the bind host "
        "(and this machine's name and addresses when bound to every interface). Others get 400, which "
        "stops DNS rebinding.",
    )
    allowed_origins: str = Field(
        "",
        description="Comma-separated extra origins (e.g. https://wall.example.org) allowed to open the "
        "WebSocket and send POST/DELETE; the viewer's own origin always is, any other is refused.",
    )
    auth_fail_burst: int = Field(
        10, ge=1, le=1000, description="Failed token attempts a client (IP) may make before it is throttled."
    )
    auth_fail_refill_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Once throttled, a client gets one more attempt per this many seconds (429 with "
        "Retry-After meanwhile).",
    )
    max_faces: int = Field(
        128, ge=1, le=MAX_FACES, description="Most faces of one result tracked and drawn (best scores kept)."
    )
    max_tracks: int = Field(256, ge=1, le=10_000, description="Most face tracks kept per camera.")

    @field_validator("viewer_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Never echo the value: it is a secret, even when it is a bad one.
        if value is None:
            return None
        token = value.get_secret_value()
        if token != token.strip():
            raise ValueError("GENDERLENS_VIEWER_TOKEN must not start or end with whitespace")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"GENDERLENS_VIEWER_TOKEN has {len(token)} characters; at least {MIN_TOKEN_LENGTH} "
                f"are required ({TOKEN_HINT})"
            )
        if len(set(token)) < MIN_TOKEN_DISTINCT:
            raise ValueError(f"GENDERLENS_VIEWER_TOKEN is too repetitive ({TOKEN_HINT})")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: str) -> str:
        for pattern in _csv(value):
            if "*" in pattern[1:] or (
                pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")
            ):
                raise ValueError(f"bad host pattern {pattern!r}: use a name, '*.example.org' or '*'")
        return value

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

    def trusted_hosts(self) -> list[str]:
        """Host names the viewer answers to (Starlette's TrustedHostMiddleware patterns)."""
        hosts = ["localhost", "127.0.0.1", "[::1]"]
        bind = self.host.strip("[]")
        if bind:  # also a wildcard address itself, which `genderlens up` prints as the URL to open
            hosts.append(f"[{bind}]" if ":" in bind else bind)
        if bind in WILDCARD_HOSTS:
            # Bound to every interface: this machine's own name and addresses are ours too.
            names = {socket.gethostname()}
            with contextlib.suppress(OSError):
                names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
            hosts += sorted(n for n in names if n)
        hosts += _csv(self.allowed_hosts)
        return list(dict.fromkeys(h.lower() for h in hosts))

    def extra_origins(self) -> set[str]:
        return {o.rstrip("/").lower() for o in _csv(self.allowed_origins)}
