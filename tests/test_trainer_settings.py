"""The trainer's settings: one class per command, every field described, the flags generated from the
fields (the same flags as before), and from the environment only what every service shares."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trainer.settings import EvalSettings, TrainSettings

#: ``genderlens train``'s flags before they were generated from TrainSettings (less the gate's, which
#: shared.models.promotion declares for `train` and `models promote` alike).
TRAIN_FLAGS = [
    "--data",
    "--format",
    "--arch",
    "--arch-config",
    "--pretrained",
    "--mode",
    "--trainable-blocks",
    "--backbone-lr-scale",
    "--backbone-weights",
    "--backbone-cache",
    "--feature-views",
    "--head-epochs",
    "--balance-ages",
    "--head-hidden",
    "--input-size",
    "--margin",
    "--epochs",
    "--batch-size",
    "--lr",
    "--warmup-epochs",
    "--weight-decay",
    "--label-smoothing",
    "--patience",
    "--max-minutes",
    "--device",
    "--threads",
    "--out",
    "--name",
    "--no-publish",
    "--no-current",
    "--ignore-gate",
    "--gate-tolerance",
    "--gate-max-class-gap",
    "--gate-max-group-gap",
    "--gate-min-n",
    "--resume",
    "--checkpoint-dir",
    "--seed",
    "--split-seed",
    "--val-fraction",
    "--test-fraction",
    "--dup-groups",
    "--cache-dir",
    "--no-face",
    "--detector",
    "--weights-dir",
    "--redis-url",
    "--no-announce",
    "--flip-tta",
]
EVAL_FLAGS = [
    "--data",
    "--model",
    "--detector",
    "--weights-dir",
    "--score-threshold",
    "--max-side",
    "--fallback-sides",
    "--variants",
    "--json",
    "--threads",
    "--device",
    "--limit",
]


def _parser(cls: type[TrainSettings] | type[EvalSettings]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    return parser


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


@pytest.mark.parametrize(("cls", "flags"), [(TrainSettings, TRAIN_FLAGS), (EvalSettings, EVAL_FLAGS)])
def test_the_flags_are_generated_from_described_fields(
    cls: type[TrainSettings] | type[EvalSettings], flags: list[str]
) -> None:
    assert sorted(_flags(_parser(cls))) == sorted(flags)
    assert all(field.description for field in cls.model_fields.values())


def test_flags_and_shared_variables_build_the_settings_and_worker_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The inference worker's settings of the same names (same .env, same shell) must not leak in.
    monkeypatch.setenv("GENDERLENS_DEVICE", "cuda")
    monkeypatch.setenv("GENDERLENS_BATCH_SIZE", "8")
    monkeypatch.setenv("GENDERLENS_DETECTOR", "torch-yunet")
    monkeypatch.setenv("GENDERLENS_RESUME", str(tmp_path / "nowhere.pt"))
    monkeypatch.setenv("GENDERLENS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("GENDERLENS_REDIS_URL", "redis://redis:6379/0")
    args = _parser(TrainSettings).parse_args(["--data", "d", "--epochs", "3", "--gate-min-n", "7"])
    settings = TrainSettings.from_args("train", args)
    assert (settings.device, settings.batch_size, settings.detector, settings.resume) == (
        "auto",
        128,
        "cv2-yunet",
        None,
    )
    assert (
        settings.weights_dir == tmp_path and settings.redis_url.get_secret_value() == "redis://redis:6379/0"
    )
    assert (settings.data, settings.epochs, settings.gate.min_n, settings.ignore_gate) == (
        Path("d"),
        3,
        7,
        False,
    )
    args = _parser(TrainSettings).parse_args(
        ["--data", "d", "--weights-dir", "w", "--redis-url", "redis://x/1"]
    )
    settings = TrainSettings.from_args("train", args)  # a flag overrides its variable
    assert settings.weights_dir == Path("w") and settings.redis_url.get_secret_value() == "redis://x/1"


def test_bad_settings_exit_at_start_naming_the_field() -> None:
    args = _parser(TrainSettings).parse_args(["--data", "d", "--arch-config", "[1]"])
    with pytest.raises(
        SystemExit, match=r"genderlens train: invalid settings: arch_config: .*not a JSON object"
    ):
        TrainSettings.from_args("train", args)
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainSettings(data=Path("d"), mode="half-frozen")
    args = _parser(TrainSettings).parse_args(["--data", "d", "--gate-min-n", "0"])
    with pytest.raises(SystemExit, match="--gate-min-n must be at least 1"):
        TrainSettings.from_args("train", args)


def test_eval_settings_take_json_and_the_shared_weights_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GENDERLENS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("GENDERLENS_DEVICE", "cuda")  # the worker's, not eval's
    args = _parser(EvalSettings).parse_args(["--data", "photos", "--json", "out.json"])
    settings = EvalSettings.from_args("eval", args)
    assert settings.json_out == Path("out.json") and settings.weights_dir == tmp_path
    assert settings.device == "cpu" and settings.variants == "colour,grayscale,dark"
