"""Settings: env prefix, validation at start, CLI overrides, secrets never printed."""

from __future__ import annotations

from pathlib import Path

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


def test_model_paths_read_the_prefixed_variables_whatever_the_base_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The trainer's settings list CommonSettings first: the mixin's own (unprefixed) config used to win,
    so in a container `genderlens train` ignored GENDERLENS_WEIGHTS_DIR (and tried to download the
    detector weights) and GENDERLENS_REDIS_URL (the new version was announced to 127.0.0.1)."""
    from shared.settings import CommonSettings, ModelPathsMixin

    class CommonFirst(CommonSettings, ModelPathsMixin):
        pass

    class MixinFirst(ModelPathsMixin, CommonSettings):
        pass

    monkeypatch.setenv("GENDERLENS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("GENDERLENS_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("WEIGHTS_DIR", "/unprefixed")
    for cls in (CommonFirst, MixinFirst):
        settings = cls()
        assert settings.weights_dir == tmp_path, cls.__name__
        assert settings.redis_url.get_secret_value() == "redis://redis:6379/0", cls.__name__
