"""Class names come from the model, not from the viewer (issue #13): "female"/"male" were written into
the viewer's counts, colours and page, so a model retrained on other folders (``cat/``, ``dog/``,
``other/``) was counted as nothing and drawn in a colour meant for "any other class".

End to end on real parts: a real 3-class artifact (an untrained gendernet whose head is biased
towards ``other``, so the test knows the label every face gets), real ``genderlens capture`` (a
folder of real face photos) and ``genderlens infer`` processes on the test Redis, and the viewer app
with its lifespan (``TestClient``): its API, WebSocket and the drawn snapshot. The page itself is
checked in ``test_browser_viewer_ui.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from services.viewer.app import create_app
from services.viewer.palette import CLASS_COLOURS, NO_MODEL_COLOUR, UNCERTAIN_COLOUR, bgr, colour_of, text_on
from services.viewer.state import classes_of
from shared.schema import FIELD, Face, ModelRef, Result, SchemaError, Timestamps, _pack
from tests.helpers.photos import make_photo_folder
from tests.helpers.processes import Services, service_env
from tests.helpers.viewer import viewer_settings
from tests.helpers.waiting import wait_until

CLASSES = ["cat", "dog", "other"]
OKABE_ITO = {"cat": "#E69F00", "dog": "#56B4E9", "other": "#009E73"}


# -- colours and the class list, on their own -------------------------------------------------------
def test_colours_follow_the_models_class_order() -> None:
    # The shipped model's classes keep their colours: orange and sky blue.
    assert colour_of("female", ("female", "male")) == "#E69F00"
    assert colour_of("male", ("female", "male")) == "#56B4E9"
    # Any model: by index in its own order, the Okabe-Ito palette, repeating after six.
    assert [colour_of(c, CLASSES) for c in CLASSES] == list(OKABE_ITO.values())
    many = [f"c{i}" for i in range(8)]
    assert colour_of("c6", many) == CLASS_COLOURS[0] and colour_of("c5", many) == "#D55E00"
    assert colour_of("uncertain", CLASSES) == UNCERTAIN_COLOUR == "#BBBBBB"
    assert colour_of("no model", CLASSES) == NO_MODEL_COLOUR == "#CC79A7"
    assert bgr("#E69F00") == (0, 159, 230)
    # Captions stay legible: black on the light colours, white on the palette's blue.
    assert text_on("#E69F00") == (0, 0, 0) and text_on("#0072B2") == (255, 255, 255)


def _result(model: ModelRef | None, probs: dict[str, float]) -> Result:
    face = Face((10.0, 10.0, 50.0, 50.0), ((20.0, 20.0),) * 5, 0.9, max(probs, key=probs.__getitem__), probs)
    return Result("cam", 1, "1-0", 640, 480, Timestamps(1.0, 1.0, 1.0, 1.0, 1.0), model, "w", (face,))


def test_results_carry_the_models_class_names() -> None:
    result = _result(
        ModelRef("pets", "1", 0.5, ("cat", "dog", "other")), {"cat": 0.2, "dog": 0.3, "other": 0.5}
    )
    back = Result.from_fields(result.to_fields())
    assert back.model is not None and back.model.classes == ("cat", "dog", "other")
    assert classes_of(back) == ("cat", "dog", "other")
    # A worker older than the field: the faces' probabilities name the classes, in the model's order.
    legacy = result.to_dict()
    del legacy["model"]["classes"]
    old = Result.from_fields({FIELD: _pack(legacy)})
    assert old.model is not None and old.model.classes == () and classes_of(old) == ("cat", "dog", "other")
    assert classes_of(_result(None, {"x": 1.0})) == ()
    for bad in (["cat", "cat"], ["cat", 3], [""], "cat", ["c"] * 65):
        broken = result.to_dict()
        broken["model"]["classes"] = bad
        with pytest.raises(SchemaError, match="classes"):
            Result.from_fields({FIELD: _pack(broken)})


# -- end to end ---------------------------------------------------------------------------------------
def publish_pet_model(models_dir: Path) -> Any:
    """A real, complete 3-class artifact. Untrained, but its head's bias makes every face ``other``
    with a confidence near 1, so the test knows what every label must be."""
    import torch

    from shared.models.archs import build_model
    from shared.models.artifact import publish_untrained

    torch.manual_seed(0)
    model = build_model("gendernet", len(CLASSES), width=8)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 0.0, 12.0]))
    return publish_untrained(
        models_dir,
        name="pets",
        version="1",
        width=8,
        model=model,
        classes=CLASSES,
        uncertain_threshold=0.5,
    )


def box_colour_share(image: np.ndarray, box: list[float], colour: str) -> float:
    """Share of the box's left edge (clipped to the frame, as it is drawn) in ``colour`` (BGR
    distance below 60)."""
    x, y, _, h = box
    x1, y1, y2 = max(0, round(x)), max(0, round(y)), min(image.shape[0], round(y + h))
    edge = image[y1:y2, x1 : x1 + 2].reshape(-1, 3).astype(np.int16)
    assert len(edge), box
    return float((np.abs(edge - np.array(bgr(colour))).max(axis=1) < 60).mean())


@pytest.mark.slow
def test_a_three_class_model_is_counted_coloured_and_labelled_end_to_end(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, weights_dir: Path
) -> None:
    models_dir = tmp_path / "models"
    publish_pet_model(models_dir)
    photos = make_photo_folder(tmp_path / "photos", count=4)
    env = service_env(redis_url, models_dir)
    services = Services(log_dir=tmp_path, base_env=env)
    settings = viewer_settings(redis_url)
    try:
        services.capture("capture", photos, "pets", fps=5)
        services.worker("worker")
        with TestClient(create_app(settings)) as viewer:
            cam = wait_until(
                lambda: next(
                    (c for c in viewer.get("/api/cameras").json() if c["id"] == "pets" and c["faces"]), None
                ),
                120,
                "a result with faces for camera pets",
            )
            # Counts: every class of the model, in its order, then uncertain; every face is "other".
            assert list(cam["counts"]) == ["faces", "cat", "dog", "other", "uncertain"], cam["counts"]
            assert cam["counts"]["other"] == cam["faces"] >= 1

            model = viewer.get("/api/model").json()
            assert model["current"] == {"name": "pets", "version": "1"}
            assert model["classes"] == [{"name": c, "colour": OKABE_ITO[c]} for c in CLASSES]
            assert viewer.get("/api/stats").json()["model"]["classes"] == model["classes"]

            latest = viewer.get("/api/cameras/pets/latest").json()
            assert latest["model"]["classes"] == CLASSES
            assert {t["label"] for t in latest["tracks"]} == {"other"}
            assert all(list(t["probs"]) == CLASSES for t in latest["tracks"])

            with viewer.websocket_connect("/ws") as ws:
                messages: dict[str, dict[str, Any]] = {}
                while len(messages) < 2:
                    message = json.loads(ws.receive_text())
                    if message["type"] in ("stats", "result"):
                        messages.setdefault(message["type"], message)
            stats, result = messages["stats"], messages["result"]
            assert stats["classes"] == model["classes"]
            assert {"faces", *CLASSES, "uncertain"} <= set(stats["totals"])
            assert "female" not in stats["totals"] and "male" not in stats["totals"]
            assert list(result["counts"])[:4] == ["faces", *CLASSES]

            # The boxes are drawn in the colour of "other" (bluish green), not in female/male's.
            def drawn() -> tuple[np.ndarray, list[dict[str, Any]]] | None:
                snap = viewer.get("/cameras/pets/snapshot.jpg")
                if snap.headers.get("x-genderlens-kind") != "shown":
                    return None
                faces = json.loads(snap.headers["x-genderlens-faces"])
                image = cv2.imdecode(np.frombuffer(snap.content, np.uint8), cv2.IMREAD_COLOR)
                return (image, faces) if faces else None

            image, faces = wait_until(drawn, 30, "a snapshot with its faces drawn")
            for face in faces:
                assert face["label"] == "other"
                assert box_colour_share(image, face["box"], OKABE_ITO["other"]) > 0.5, face
                for other in ("#E69F00", "#56B4E9", UNCERTAIN_COLOUR):
                    assert box_colour_share(image, face["box"], other) < 0.1, (face, other)
    except AssertionError:
        print(services.dump_logs())
        raise
    finally:
        services.close()
