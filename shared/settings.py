"""Settings shared by every service. Each service has one settings class of its own (in its package)
that subclasses :class:`CommonSettings`; it is built once at start-up (env vars prefixed
``GENDERLENS_``, then CLI overrides), validated, and passed down. Nothing else reads ``os.environ``.

CLI flags are declared once, by naming the fields they set: ``Settings.add_flags(parser, "fps",
Flag("worker_name", "--name"))`` makes each flag from its field (type, choices, the field's description
as help, its variable and default shown), and ``Settings.from_args(command, args)`` applies the flags
that were given on top of the environment. A flag that is not given leaves nothing in ``args``
(``argparse.SUPPRESS``), so only what the user typed overrides a variable.

A ``GENDERLENS_*`` variable that no settings class of the project knows (a misspelt one would
otherwise be ignored without a word, ``extra="ignore"``) is warned about once per process when
settings load, by name, never with its value. Known are the fields of every service's settings, since
``genderlens up`` hands its whole environment to its children and compose files set per-service
variables, and the variables of the deployment files, scripts and test suite (``OTHER_VARIABLES``).
"""

from __future__ import annotations

import argparse
import logging
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "GENDERLENS_"

log = logging.getLogger(__name__)

#: Every field of the project's settings classes, as its variable (capture, inference, viewer, up,
#: models, and the shared ones the trainer reads): tests/test_settings.py checks the list against the classes.
SETTINGS_VARIABLES: frozenset[str] = frozenset(
    ENV_PREFIX + name.upper()
    for name in (
        # CommonSettings, ModelPathsMixin
        "redis_url", "redis_timeout_s", "log_level", "metrics_port", "metrics_host",
        "models_dir", "weights_dir", "weights_cache_dir",
        # capture
        "source", "camera_id", "fps", "loop", "jpeg_quality", "max_width", "frames_maxlen",
        "reconnect_max_s", "open_timeout_s", "slide_seconds", "publish_queue",
        # inference
        "detector", "detector_score_threshold", "detector_max_side", "detector_fallback_sides",
        "detector_fallback_every", "device", "torch_threads", "batch_size", "max_wait_ms", "block_ms",
        "staleness_ms", "claim_idle_ms", "max_deliveries", "results_maxlen", "uncertain_threshold",
        "worker_name", "drain_timeout_s", "model_poll_s", "cameras_refresh_s", "health_file",
        "health_max_age_s",
        # viewer
        "host", "port", "viewer_token", "blur_faces", "stream_fps", "frame_buffer", "no_signal_after_s",
        "allow_camera_control", "allowed_hosts", "allowed_origins", "auth_fail_burst",
        "auth_fail_refill_s", "max_faces", "max_tracks", "source_dirs", "camera_request_key",
        # up
        "workers", "sources", "stop_timeout_s", "start_timeout_s",
    )
)  # fmt: skip
#: Variables that are not settings: docker compose's (.env: images, ports and folders on the host),
#: the image build's, the smoke run's and the test suite's. Each is named in those files or docs.
OTHER_VARIABLES: frozenset[str] = frozenset(
    ENV_PREFIX + name
    for name in (
        # docker compose (.env): images, build inputs, host ports, devices and folders
        "REGISTRY", "TAG", "PYTHON_IMAGE", "REDIS_IMAGE", "SITE_IMAGE", "TORCH_FLAVOUR",
        "WEIGHTS_BASE_URL", "WORKER_TARGET", "VIEWER_BIND", "VIEWER_PORT", "VIEWER_JPEG_QUALITY",
        "CAPTURE_JPEG_QUALITY", "CAMERA_DEVICE", "VIDEO_GID", "DATASET_DIR", "MODELS_PATH",
        "TRAINER_SHM_SIZE", "TLS_DIR",
        # docker/install.py, docker/tls/make-certs.sh, the smoke run
        "BUILD_DIR", "TLS_DAYS", "DEBIAN_MIRROR", "SMOKE_CACHE",
        # the test suite (CI sets these; GENDERLENS_TEST_* are all the suite's)
        "REQUIRE_SHARED", "REQUIRE_BROWSER",
    )
)  # fmt: skip
KNOWN_VARIABLES: frozenset[str] = SETTINGS_VARIABLES | OTHER_VARIABLES
KNOWN_PREFIXES: tuple[str, ...] = (ENV_PREFIX + "TEST_",)
_warned: set[str] = set()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``GENDERLENS_*`` names in ``environ`` that nothing of the project reads (case-insensitive,
    as pydantic-settings reads them)."""
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in KNOWN_VARIABLES
        and not name.upper().startswith(KNOWN_PREFIXES)
    )


def warn_unknown_variables(command: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Log a warning for each unknown ``GENDERLENS_*`` variable, once per process; never its value,
    which may be a secret. Returns the names warned about now."""
    names = [n for n in unknown_variables(os.environ if environ is None else environ) if n not in _warned]
    for name in names:
        log.warning(
            "genderlens %s: %s is not a genderlens setting and is ignored (misspelt? every setting is "
            "listed in .env.example)",
            command,
            name,
        )
    _warned.update(names)
    return names


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL (redis:// or rediss://, may hold a password; never logged).",
    )
    redis_timeout_s: float = Field(5.0, gt=0, description="Socket timeout for every Redis call.")
    log_level: str = Field("INFO", description="Python logging level.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off.")
    metrics_host: str = Field("127.0.0.1", description="Interface for the /metrics server.")

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, *flags: str | Flag) -> None:
        """Add one CLI flag per named field (or :class:`Flag`), generated from the field."""
        for flag in flags:
            spec = Flag(flag) if isinstance(flag, str) else flag
            _add_flag(parser, spec, cls.model_fields[spec.field])

    @classmethod
    def from_args(cls, command: str, args: argparse.Namespace) -> Self:
        """:meth:`load` with the flags of ``args`` that name a field of this class as overrides."""
        given = {name: value for name, value in vars(args).items() if name in cls.model_fields}
        return cls.load(command, **given)

    @classmethod
    def load(cls, command: str, **overrides: Any) -> Self:
        """Build from the environment, apply CLI flags, validate. On any error exit with one line per
        bad field. Only pydantic's message is shown, never the input value, which may be a secret
        (a Redis URL with its password). Flags are init arguments, so a field without a default may
        come from a flag alone (``None`` means: flag not given)."""
        warn_unknown_variables(command)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
                for err in exc.errors()
            )
            raise SystemExit(f"genderlens {command}: invalid settings: {problems}") from None

    def with_overrides(self, **overrides: Any) -> Self:
        """Return a validated copy with CLI flags applied (``None`` means: flag not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        data = self.model_dump()
        data.update(given)
        return type(self).model_validate(data)


class ModelPathsMixin(BaseSettings):
    """Where model artifacts and detector weights live (inference worker, trainer, eval, bench)."""

    # The same config as CommonSettings: pydantic merges the bases' configs in order, so without it a
    # class listing CommonSettings first would read WEIGHTS_DIR instead of GENDERLENS_WEIGHTS_DIR.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    models_dir: Path = Field(Path("models"), description="Folder of versioned model artifacts.")
    weights_dir: Path | None = Field(
        None,
        description="Folder holding detector weights (e.g. ../shared/weights/yunet); when unset they "
        "are downloaded once from pinned URLs into weights_cache_dir and checked against sha256.",
    )
    weights_cache_dir: Path = Field(
        Path.home() / ".cache" / "genderlens" / "weights",
        description="Download cache for detector weights.",
    )


# -- CLI flags generated from the fields -------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """A CLI flag for a settings field. By default it is ``--field-name`` with the field's description
    as help; ``name`` and ``help`` replace those (the variable and the default are always shown)."""

    field: str
    name: str | None = None
    help: str | None = None
    metavar: str | None = None


def _add_flag(parser: argparse.ArgumentParser, spec: Flag, info: FieldInfo) -> None:
    kind, choices = _flag_type(info.annotation)
    options: dict[str, Any] = {"dest": spec.field, "default": argparse.SUPPRESS, "help": _help(spec, info)}
    if kind is bool:
        default_on = info.get_default(call_default_factory=True) is True
        options["action"] = argparse.BooleanOptionalAction if default_on else "store_true"
    else:
        options["type"] = kind
        options["metavar"] = spec.metavar
        if choices:
            options["choices"] = choices
        if get_origin(_optional_inner(info.annotation)) is list:
            options["action"] = "append"  # repeat the flag for several values
    parser.add_argument(spec.name or "--" + spec.field.replace("_", "-"), **options)


def _optional_inner(annotation: Any) -> Any:
    """``X`` for ``X | None`` (and ``Optional[X]``), else the annotation itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _flag_type(annotation: Any) -> tuple[Any, Sequence[Any]]:
    """The argparse type of a field (pydantic validates the value afterwards) and its choices."""
    inner = _optional_inner(annotation)
    if get_origin(inner) is list:
        inner = get_args(inner)[0] if get_args(inner) else str
    if get_origin(inner) is Literal:
        values = get_args(inner)
        return type(values[0]), values
    if inner in (bool, int, float, Path):
        return inner, ()
    return str, ()  # str, SecretStr and anything else pydantic parses from text


def _help(spec: Flag, info: FieldInfo) -> str:
    text = (spec.help or info.description or "").strip().rstrip(".")
    variable = ENV_PREFIX + spec.field.upper()
    default = _default_text(info.get_default(call_default_factory=True))
    # argparse formats help with %: a literal one (e.g. "40%") must be doubled.
    return f"{text} (env {variable}; default: {default})".replace("%", "%%")


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, SecretStr):
        return value.get_secret_value()  # a default is written in this code, never a user's secret
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
