"""The worker's model loading side on real photos: no artifact -> `unknown` labels; a test artifact
-> class labels and probabilities; the model manager follows the `current` pointer."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from services.inference.models import ModelManager
from services.inference.pipeline import Pipeline
from shared.detectors import DetectorConfig, create
from shared.models.artifact import UNKNOWN, ArtifactError, load_artifact
from tests.helpers.artifacts import make_artifact
from tests.helpers.photos import face_photos


@pytest.fixture(scope="module")
def pipeline(weights_dir: Path) -> Pipeline:
    return Pipeline(create("cv2-yunet", DetectorConfig(weights_dir=weights_dir)))


def _jpegs(eval_dir: Path, n: int) -> list[bytes]:
    return [cv2.imencode(".jpg", cv2.imread(str(p)))[1].tobytes() for p in face_photos(eval_dir, n)]


def test_without_a_model_faces_are_unknown(pipeline: Pipeline, eval_dir: Path, tmp_path: Path) -> None:
    manager = ModelManager(tmp_path / "empty", "cpu")
    assert manager.check() is False and manager.current is None
    outputs = pipeline.process(_jpegs(eval_dir, 3), None, None)
    faces = [f for out in outputs for f in out.faces]  # type: ignore[union-attr]
    assert faces and all(f.label == UNKNOWN and f.probs == {} for f in faces)


def test_with_an_artifact_faces_get_class_probabilities(
    pipeline: Pipeline, eval_dir: Path, tmp_path: Path
) -> None:
    meta = make_artifact(tmp_path, name="e2etest")
    manager = ModelManager(tmp_path, "cpu")
    assert manager.check() is True
    assert manager.current is not None and manager.current.meta == meta
    outputs = pipeline.process([*_jpegs(eval_dir, 3), b"\xff\xd8garbage"], manager.current, None)
    assert getattr(outputs[-1], "reason", "") == "truncated JPEG: no end-of-image marker"
    faces = [f for out in outputs[:-1] for f in out.faces]  # type: ignore[union-attr]
    assert faces and all(f.label in meta.classes and set(f.probs) == set(meta.classes) for f in faces)
    assert manager.check() is False  # unchanged pointer: nothing reloaded


def test_a_broken_artifact_is_refused_whole(tmp_path: Path) -> None:
    meta = make_artifact(tmp_path, name="e2etest")
    weights = tmp_path / meta.dirname / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="unreadable weights"):
        load_artifact(tmp_path / meta.dirname)
