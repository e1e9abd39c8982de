"""Settings: env prefix, validation at start, CLI overrides, secrets never printed."""

from __future__ import annotations

import argparse
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


# -- CLI flags generated from the settings' fields (shared.settings: add_flags / from_args) ---------
def _parser(cls: type, *flags: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    cls.add_flags(parser, *flags)  # type: ignore[attr-defined]
    return parser


def test_a_flag_not_given_leaves_the_variable_alone_and_a_given_one_overrides_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GENDERLENS_FPS", "7.5")
    monkeypatch.setenv("GENDERLENS_LOOP", "true")
    parser = _parser(CaptureSettings, "fps", "loop", "camera_id")
    assert vars(parser.parse_args([])) == {}  # nothing given: nothing to override
    settings = CaptureSettings.from_args("capture", parser.parse_args([]))
    assert settings.fps == 7.5 and settings.loop is True
    settings = CaptureSettings.from_args("capture", parser.parse_args(["--fps", "20", "--camera-id", "door"]))
    assert settings.fps == 20.0 and settings.camera_id == "door" and settings.loop is True


def test_flags_take_their_type_name_and_help_from_the_field() -> None:
    from shared.settings import Flag

    parser = _parser(InferenceSettings, "batch_size", Flag("worker_name", "--name"), "models_dir")
    args = parser.parse_args(["--batch-size", "4", "--name", "w1", "--models-dir", "m"])
    assert vars(args) == {"batch_size": 4, "worker_name": "w1", "models_dir": Path("m")}
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-size", "four"])  # argparse's own error, as before
    text = " ".join(parser.format_help().split())
    assert (
        "Most frames per pass of the pipeline, and per camera in one read (env GENDERLENS_BATCH_SIZE; default: 8)"
        in text
    )
    assert "(env GENDERLENS_WORKER_NAME; default: unset)" in text
    # a value pydantic refuses is the settings' one-line error, naming the field
    with pytest.raises(SystemExit, match="genderlens infer: invalid settings: batch_size:"):
        InferenceSettings.from_args("infer", parser.parse_args(["--batch-size", "0"]))


def test_bool_list_literal_and_percent_fields_make_working_flags() -> None:
    from typing import Literal

    from pydantic import Field

    from shared.settings import CommonSettings, Flag

    class Demo(CommonSettings):
        on: bool = Field(True, description="On by default.")
        off: bool = Field(False, description="Off by default.")
        items: list[str] = Field(default_factory=list, description="Repeatable.")
        mode: Literal["a", "b"] = Field("a", description="One of two.")
        share: float = Field(0.4, description="About 40% of it.")

    parser = _parser(Demo, "on", "off", Flag("items", "--item"), "mode", "share")
    args = parser.parse_args(["--no-on", "--off", "--item", "x", "--item", "y", "--mode", "b"])
    demo = Demo.from_args("demo", args)
    assert (demo.on, demo.off, demo.items, demo.mode, demo.share) == (False, True, ["x", "y"], "b", 0.4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])  # choices from the Literal
    text = parser.format_help()  # a literal % in a description must not break argparse's formatting
    assert "About 40% of it (env GENDERLENS_SHARE; default: 0.4)" in " ".join(text.split())


@pytest.mark.parametrize("command", ["up", "capture", "infer", "view"])
def test_every_service_flag_is_a_settings_field_and_says_its_variable_and_default(command: str) -> None:
    """Declared once: each flag of a service sets the settings field of the same name (``genderlens up``
    also takes capture's --fps and --loop, for its cameras); its help names the variable and default."""
    from services.capture.settings import CaptureSettings as Capture
    from services.cli import build_parser
    from services.up import UpSettings

    fields = {
        "up": set(UpSettings.model_fields) | {"fps", "loop"},
        "capture": set(Capture.model_fields),
        "infer": set(InferenceSettings.model_fields) | {"check_health"},  # a mode, not a setting
        "view": set(ViewerSettings.model_fields),
    }[command]
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert flags
    for action in flags:
        assert action.dest in fields, f"genderlens {command} {action.option_strings}: no such setting"
        if action.dest != "check_health":
            assert action.help and f"(env GENDERLENS_{action.dest.upper()}; default: " in action.help


# -- unknown GENDERLENS_* variables are warned about (shared.settings.warn_unknown_variables) --------
def test_an_unknown_variable_is_warned_about_once_by_name_never_with_its_value(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import shared.settings as S

    monkeypatch.setattr(S, "_warned", set())
    monkeypatch.setenv("GENDERLENS_BATCH_SZE", "topsecret-value")  # misspelt GENDERLENS_BATCH_SIZE
    monkeypatch.setenv("GENDERLENS_VIEWER_TOKEN", "for-the-viewer-only-1234")  # another service's
    monkeypatch.setenv("GENDERLENS_TEST_ANYTHING", "1")  # the test suite's own
    monkeypatch.setenv("GENDERLENS_REGISTRY", "registry.example.org")  # compose's
    with caplog.at_level("WARNING", logger="shared.settings"):
        InferenceSettings.load("infer")
        CaptureSettings.load("capture")  # a second load in the same process (genderlens up) says nothing
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "genderlens infer: GENDERLENS_BATCH_SZE is not a genderlens setting" in warnings[0]
    assert "topsecret" not in caplog.text


def test_the_known_variables_are_exactly_the_fields_of_every_settings_class() -> None:
    """A new field anywhere must be listed in shared.settings.SETTINGS_VARIABLES (and a removed one
    removed), or starting a service would warn about a setting it reads."""
    import importlib
    import pkgutil

    from pydantic_settings import BaseSettings

    from shared.settings import ENV_PREFIX, SETTINGS_VARIABLES

    for package in ("shared", "services", "trainer"):
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, f"{package}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    classes, todo = [], [BaseSettings]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in ("shared", "services", "trainer"):
                classes.append(sub)
    assert {"CaptureSettings", "InferenceSettings", "ViewerSettings", "UpSettings"} <= {
        c.__name__ for c in classes
    }
    from trainer.settings import SHARED_ENV, CommandSettings

    def env_fields(cls: type[BaseSettings]) -> set[str]:
        # The trainer's commands read only the shared variables from the environment; their other
        # fields are flags (trainer/settings.py says why), so they are no variables at all.
        names = set(cls.model_fields)
        return names & SHARED_ENV if issubclass(cls, CommandSettings) else names

    fields = {ENV_PREFIX + name.upper() for cls in classes for name in env_fields(cls)}
    assert sorted(fields - SETTINGS_VARIABLES) == [], "fields missing from SETTINGS_VARIABLES"
    assert sorted(SETTINGS_VARIABLES - fields) == [], "SETTINGS_VARIABLES lists no such field"
    # the warning sends people to .env.example for the list: it must hold every setting
    example = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    assert sorted(v for v in SETTINGS_VARIABLES if v not in example) == []


def test_every_variable_the_project_mentions_is_known_and_every_other_variable_is_used() -> None:
    """Compose files, .env.example, docker/, scripts, CI, docs and tests name GENDERLENS_* variables:
    none of them may be warned about. Each of OTHER_VARIABLES is named somewhere (none is stale)."""
    import re

    from shared.settings import KNOWN_PREFIXES, KNOWN_VARIABLES, OTHER_VARIABLES

    repo = Path(__file__).resolve().parents[1]
    files = [
        *repo.glob("*.yml"),
        repo / ".env.example",
        repo / "README.md",
        repo / ".ci" / "run",
        *repo.glob("docs/*.md"),
        *(p for p in (repo / "docker").rglob("*") if p.is_file()),
        *(p for p in (repo / "scripts").iterdir() if p.is_file()),
        *(
            p
            for pkg in ("shared", "services", "trainer", "tools", "tests")
            for p in (repo / pkg).rglob("*.py")
        ),
    ]
    named = set()
    for path in files:
        if path.resolve() in (Path(__file__).resolve(), Path(__file__).with_name("test_trainer_settings.py")):
            continue  # these files name misspelt or ignored variables on purpose
        text = path.read_text(encoding="utf-8", errors="replace")
        named |= set(re.findall(r"GENDERLENS_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])", text))
    unknown = sorted(
        n
        for n in named
        if n not in KNOWN_VARIABLES
        and not n.startswith(KNOWN_PREFIXES)
        and not any(p.startswith(n) for p in KNOWN_PREFIXES)  # the prefix itself, as a filter
    )
    assert unknown == [], "named in the project but unknown to shared.settings"
    assert sorted(OTHER_VARIABLES - named) == [], "OTHER_VARIABLES named nowhere"


def test_a_service_started_with_a_misspelt_variable_says_so_on_stderr(tmp_path: Path) -> None:
    """End to end: the warning reaches the user before logging is set up (a health check here)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("GENDERLENS_")}
    env.update(GENDERLENS_HEALTH_FILEE=str(tmp_path / "secret-path"))  # misspelt GENDERLENS_HEALTH_FILE
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "infer", "--check-health"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 1  # the real GENDERLENS_HEALTH_FILE is unset
    assert "genderlens infer: GENDERLENS_HEALTH_FILEE is not a genderlens setting" in done.stderr
    assert "secret-path" not in done.stderr + done.stdout
