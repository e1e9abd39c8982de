"""Settings: env prefix, validation at start, CLI overrides, secrets never printed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.capture.settings import CaptureSettings
from services.inference.settings import InferenceSettings
from services.viewer.settings import ViewerSettings


def test_env_prefix_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERLENS_FPS", "7.5")
    monkeypatch.setenv("GENDERLENS_REDIS_URL", "redis://:hunter2@example:6379/1")
    settings = CaptureSettings()
    assert settings.fps == 7.5
    assert settings.with_overrides(fps=20, source=None).fps == 20
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.redis_url.get_secret_value().endswith("/1")


def test_invalid_values_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERLENS_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        InferenceSettings()
    monkeypatch.delenv("GENDERLENS_BATCH_SIZE")
    with pytest.raises(ValidationError):
        InferenceSettings(device="tpu")
    with pytest.raises(ValidationError):
        CaptureSettings(redis_url="http://not-redis")
    with pytest.raises(ValidationError):
        CaptureSettings(log_level="chatty")


def test_viewer_refuses_public_bind_without_token() -> None:
    with pytest.raises(ValidationError, match="without GENDERLENS_VIEWER_TOKEN"):
        ViewerSettings(host="0.0.0.0")
    assert ViewerSettings(host="0.0.0.0", viewer_token="s3cret-viewer-token").host == "0.0.0.0"
    assert ViewerSettings().host == "127.0.0.1"


def test_load_exits_with_field_errors_and_never_echoes_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDERLENS_REDIS_URL", "http://:topsecret@redis.example:6379/0")
    with pytest.raises(SystemExit) as info:
        CaptureSettings.load("capture", fps=None)
    message = str(info.value)
    assert message.startswith("genderlens capture: invalid settings: redis_url:")
    assert "topsecret" not in message
