"""Settings shared by every service. Each service has one settings class of its own (in its package)
that subclasses :class:`CommonSettings`; it is built once at start-up (env vars prefixed
``GENDERLENS_``, then CLI overrides), validated, and passed down. Nothing else reads ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "GENDERLENS_"


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
    def load(cls, command: str, **overrides: Any) -> Self:
        """Build from the environment, apply CLI flags, validate. On any error exit with one line per
        bad field. Only pydantic's message is shown, never the input value, which may be a secret
        (a Redis URL with its password). Flags are init arguments, so a field without a default may
        come from a flag alone (``None`` means: flag not given)."""
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
