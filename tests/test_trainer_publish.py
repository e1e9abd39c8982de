"""Atomic publishing: a publish killed part-way (SIGKILL, in a real child process) leaves the previous
``current`` intact and loadable; broken artifacts are refused whole."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.models.archs import build_model
from shared.models.artifact import (
    ArtifactError,
    ModelMeta,
    current_dir,
    list_versions,
    load_artifact,
    publish,
)
from shared.preprocess import PREPROCESS_VERSION

REPO = Path(__file__).resolve().parents[1]


def _meta(version: str) -> ModelMeta:
    return ModelMeta(
        name="gender", version=version, arch="gendernet", arch_config={"width": 8}, classes=["female", "male"],
        input_size=32, margin=1.0, mean=[0.5] * 3, std=[0.25] * 3, preprocess_version=PREPROCESS_VERSION,
    )  # fmt: skip


def _publish_v1(models: Path) -> Path:
    return publish(
        models, build_model("gendernet", 2, width=8), _meta("v1"), extra_files={"report.json": b"{}"}
    )


_CHILD = """
import os, signal, sys
from pathlib import Path
import shared.models.artifact as A
from shared.models.archs import build_model
from shared.preprocess import PREPROCESS_VERSION
stage = sys.argv[2]
def die_half_way(fh, data):
    fh.write(data[: len(data) // 2])  # half written, then the process dies
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
real_write, real_atomic = A.write_synced, A.atomic_write
def dying_write(path, data):
    if stage == "weights" and path.name == A.WEIGHTS_FILE:
        with path.open("wb") as fh:
            die_half_way(fh, data)
    real_write(path, data)
def dying_atomic(path, data):
    if stage == "current" and path.name == A.CURRENT_FILE:
        return real_atomic(path, lambda fh: die_half_way(fh, data))  # dies inside the real atomic write
    real_atomic(path, data)
A.write_synced, A.atomic_write = dying_write, dying_atomic
meta = A.ModelMeta(name="gender", version="v2", arch="gendernet", arch_config={"width": 8},
                   classes=["female", "male"], input_size=32, margin=1.0, mean=[0.5] * 3, std=[0.25] * 3,
                   preprocess_version=PREPROCESS_VERSION)
A.publish(Path(sys.argv[1]), build_model("gendernet", 2, width=8), meta)
"""


@pytest.mark.parametrize("stage", ["weights", "current"])
def test_killed_publish_keeps_previous_current(tmp_path: Path, stage: str) -> None:
    models = tmp_path / "models"
    v1 = _publish_v1(models)
    assert current_dir(models) == v1
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(models), stage],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert current_dir(models) == v1  # the pointer never moved to a half-written version
    assert load_artifact(current_dir(models) or v1).meta.version == "v1"
    versions = [m.version for m in list_versions(models)]
    if stage == "weights":
        assert versions == ["v1"]  # the half-written one is only a hidden temp dir
        assert not (models / "gender-v2").exists()
    else:
        assert versions == ["v1", "v2"]  # complete, but not current


def test_versions_are_immutable(tmp_path: Path) -> None:
    _publish_v1(tmp_path)
    with pytest.raises(ArtifactError, match="already exists"):
        _publish_v1(tmp_path)


def test_broken_artifacts_are_refused(tmp_path: Path) -> None:
    v1 = _publish_v1(tmp_path)
    weights = (v1 / "model.safetensors").read_bytes()
    (v1 / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ArtifactError, match="unreadable weights"):
        load_artifact(v1)
    (v1 / "model.safetensors").write_bytes(weights)
    meta = json.loads((v1 / "model.json").read_text())
    (v1 / "model.json").write_text(json.dumps({**meta, "preprocess_version": PREPROCESS_VERSION + 1}))
    with pytest.raises(ArtifactError, match="preprocessing"):
        load_artifact(v1)
    (v1 / "model.json").write_text(json.dumps({**meta, "arch_config": {"width": 16}}))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_artifact(v1)
    (v1 / "model.json").write_text(json.dumps(meta))
    assert load_artifact(v1).meta.version == "v1"
