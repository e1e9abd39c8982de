"""One uncertainty policy: a face is `uncertain` below the model's own threshold (its metadata, chosen on
its validation split), or the worker's override of it. The worker applies it to each frame and sends
the value with every result (``ModelRef.uncertain_threshold``); the viewer applies the same value to its
smoothed labels. Before, the viewer had its own setting (0.6) while the shipped model's threshold is
0.82, so a face the worker called `uncertain` was shown as a class on the wall."""

from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient

from services.inference.pipeline import applied_threshold
from services.viewer.app import create_app
from services.viewer.settings import ViewerSettings
from services.viewer.tracker import UNCERTAIN, FaceTracker
from shared.schema import FIELD, Face, ModelRef, Result, SchemaError, Timestamps, _pack
from tests.helpers.photos import photo_jpeg, photo_paths
from tests.helpers.viewer import make_face, publish_frame, publish_result, register_camera, viewer_settings
from tests.helpers.waiting import wait_until

LMS = ((0.0, 0.0),) * 5


def _result(seq: int, p_female: float, model: ModelRef | None) -> Result:
    probs = {"female": p_female, "male": 1 - p_female}
    threshold = model.uncertain_threshold if model and model.uncertain_threshold is not None else 0.6
    label = "female" if p_female >= threshold else UNCERTAIN  # what the worker labels the frame
    t = 1000.0 + seq / 15
    face = Face(box=(100, 100, 80, 80), landmarks=LMS, score=0.9, label=label, probs=probs)
    return Result("cam", seq, f"{seq}-0", 640, 480, Timestamps(t, t, t, t, t), model, "w", (face,))


def test_viewer_labels_with_the_threshold_the_worker_applied() -> None:
    """Regression: p=0.8 under a model threshold of 0.85 is `uncertain` for the worker, and must be on
    the wall too (the viewer's own 0.6 showed `female`)."""
    tracker = FaceTracker()
    shown = [tracker.update(_result(s, 0.8, ModelRef("m", "1", 0.85)))[0] for s in range(20)]
    assert {f.raw_label for f in shown} == {UNCERTAIN}
    assert {f.label for f in shown} == {UNCERTAIN}
    # A result from an older worker (no threshold in it) falls back to the artifact default, 0.6.
    old = FaceTracker()
    assert [old.update(_result(s, 0.8, ModelRef("m", "1")))[0].label for s in range(3)][-1] == "female"


def test_results_carry_the_threshold_and_refuse_a_bad_one() -> None:
    result = _result(1, 0.9, ModelRef("m", "1", 0.82))
    back = Result.from_fields(result.to_fields())
    assert back.model == ModelRef("m", "1", 0.82)
    legacy = result.to_dict()
    del legacy["model"]["uncertain_threshold"]  # what a worker older than the field sends
    assert Result.from_fields({FIELD: _pack(legacy)}).model == ModelRef("m", "1", None)
    for bad in (1.5, -0.1, float("nan"), "0.8", True):
        data = result.to_dict()
        data["model"]["uncertain_threshold"] = bad
        with pytest.raises(SchemaError, match="uncertain_threshold"):
            Result.from_fields({FIELD: _pack(data)})


def test_the_worker_threshold_is_the_models_unless_overridden(tmp_path: object) -> None:
    from pathlib import Path

    from shared.models.artifact import load_artifact, publish_untrained

    models = Path(str(tmp_path))
    meta = publish_untrained(models, name="t", version="1", width=8, uncertain_threshold=0.82)
    clf = load_artifact(models / meta.dirname)
    assert applied_threshold(clf, None) == 0.82
    assert applied_threshold(clf, 0.5) == 0.5


def test_viewer_has_no_threshold_of_its_own_and_shows_the_models(
    rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENDERLENS_UNCERTAIN_THRESHOLD", "0.1")  # the worker's override: not the viewer's
    settings = viewer_settings()
    assert "uncertain_threshold" not in ViewerSettings.model_fields
    jpeg, w, h = photo_jpeg(photo_paths(1)[0])
    register_camera(rdb, "cam-u")
    with TestClient(create_app(settings)) as client:

        def latest() -> dict[str, object] | None:
            entry_id, frame = publish_frame(rdb, "cam-u", int(time.time() * 10), jpeg, w, h)
            publish_result(
                rdb, entry_id, frame, [make_face((50, 50, 120, 120), 0.8)], ModelRef("t", "1", 0.85)
            )
            body = client.get("/api/cameras/cam-u/latest")
            return body.json() if body.status_code == 200 and body.json().get("tracks") else None

        data = wait_until(latest, 15, what="a tracked face")
        assert data["tracks"][0]["label"] == UNCERTAIN  # type: ignore[index]
        model = client.get("/api/model").json()
        assert model["current"] == {"name": "t", "version": "1"} and model["uncertain_threshold"] == 0.85
