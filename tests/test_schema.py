"""Wire schema: round trips, and every kind of bad input is a SchemaError with a reason."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest

from shared.schema import (
    FIELD,
    MAX_FACES,
    MAX_MESSAGE_BYTES,
    MAX_PIXELS,
    CameraInfo,
    Event,
    Face,
    Frame,
    ModelEvent,
    ModelRef,
    Result,
    SchemaError,
    Timestamps,
    check_jpeg,
)
from tests.helpers.media import bomb
from tests.helpers.media import flat_jpeg as real_jpeg

JPEG = real_jpeg(640, 480)


def make_result() -> Result:
    face = Face(
        box=(10.0, 20.0, 30.0, 40.0),
        landmarks=((1.0, 2.0), (3.0, 4.0), (5.0, 6.0), (7.0, 8.0), (9.0, 10.0)),
        score=0.93,
        label="female",
        probs={"female": 0.9, "male": 0.1},
    )
    return Result(
        camera_id="cam-1",
        seq=7,
        frame_id="1700000000000-0",
        width=640,
        height=480,
        timestamps=Timestamps(1.0, 1.1, 1.2, 1.3, 1.4),
        model=ModelRef("gendernet", "v1"),
        worker="w-1",
        faces=(face,),
    )


def test_frame_round_trip() -> None:
    frame = Frame("cam-1", 3, 1700000000.5, 640, 480, JPEG)
    assert Frame.from_fields(frame.to_fields()) == frame
    # redis-py hands fields back with bytes keys; str keys (decode_responses) work too
    assert Frame.from_fields({"m": frame.pack()}) == frame


def test_result_round_trip() -> None:
    result = make_result()
    back = Result.from_fields(result.to_fields())
    assert back == result
    assert back.timestamps.stages_ms()["total"] == pytest.approx(400.0)


def test_result_without_model() -> None:
    result = make_result()
    plain = dataclasses.replace(result, model=None)
    assert Result.from_fields(plain.to_fields()).model is None


def test_other_messages_round_trip() -> None:
    info = CameraInfo("cam-1", "video.mp4", 15.0, "live", 1.0, 2.0)
    assert CameraInfo.unpack(info.pack()) == info
    event = ModelEvent("gendernet", "v2", "gendernet-v2", 3.0)
    assert ModelEvent.from_fields(event.to_fields()) == event
    ev = Event("error", "worker-1", "refused model", 4.0)
    assert Event.from_fields(ev.to_fields()) == ev


def _packed(**changes: object) -> dict[bytes, bytes]:
    obj = Frame("cam-1", 3, 1.0, 640, 480, JPEG).to_dict()
    obj.update(changes)
    return {FIELD: msgpack.packb(obj, use_bin_type=True)}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "missing field"),
        ({FIELD: b"\xc1\xc1 not msgpack"}, "not msgpack"),
        ({FIELD: msgpack.packb([1, 2, 3])}, "not a map"),
        (_packed(schema_version=99), "unsupported schema_version 99"),
        (_packed(schema_version=None), "unsupported schema_version"),
        (_packed(kind="result"), "expected a frame"),
        (_packed(width=0), "absurd dimensions"),
        (_packed(height=100_000), "absurd dimensions"),
        (_packed(width=True), "bool"),
        (_packed(jpeg=b"GIF89a"), "JPEG marker"),
        (_packed(camera_id="../../etc"), "invalid camera_id"),
        (_packed(camera_id="a" * 200), "invalid camera_id"),
        (_packed(seq=-1), "negative seq"),
        (_packed(captured_at=float("nan")), "not finite"),
        (_packed(seq="7"), "'seq' has type str"),
        ({FIELD: b"\x00" * (MAX_MESSAGE_BYTES + 1)}, "exceeds"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(SchemaError) as info:
        Frame.from_fields(fields)
    assert reason in info.value.reason


def test_result_rejects_bad_faces() -> None:
    obj = make_result().to_dict()
    obj["faces"] = [{"box": [1, 2, 3], "landmarks": [], "score": 1.0, "label": "x", "probs": {}}]
    with pytest.raises(SchemaError, match="box needs 4"):
        Result.from_fields({FIELD: msgpack.packb(obj, use_bin_type=True)})


# -- decompression bombs (issue 11, item 9) --------------------------------------------------------
@pytest.mark.parametrize(
    ("declared", "header", "reason"),
    [
        ((640, 480), (30000, 30000), "absurd JPEG dimensions 30000x30000"),  # a bomb declared small
        ((8192, 8192), (8192, 8192), "absurd dimensions 8192x8192"),  # over the pixel bound, honestly
        ((640, 480), (8192, 8192), "absurd JPEG dimensions 8192x8192"),
        ((640, 480), (641, 480), "declares 640x480 but its JPEG is 641x480"),
    ],
)
def test_frames_whose_jpeg_is_a_bomb_or_lies_are_refused_before_decoding(
    declared: tuple[int, int], header: tuple[int, int], reason: str
) -> None:
    data = bomb(*header)
    assert len(data) < 1000
    frame = Frame("cam-1", 3, 1.0, declared[0], declared[1], data)
    with pytest.raises(SchemaError) as info:  # from the frame header: nothing was decoded
        Frame.from_fields(frame.to_fields())
    assert reason in info.value.reason


def test_the_pixel_bound_is_one_constant_and_admits_capture_frames() -> None:
    assert MAX_PIXELS == 4096 * 4096
    assert check_jpeg(bomb(4096, 4096)) == (4096, 4096)
    assert check_jpeg(bomb(8192, 2048)) == (8192, 2048)  # wide panoramas too, at the same cost
    with pytest.raises(SchemaError, match="absurd JPEG dimensions 4097x4096"):
        check_jpeg(bomb(4097, 4096))
    assert check_jpeg(real_jpeg(1280, 720), 1280, 720) == (1280, 720)


# -- non-finite numbers and wrong shapes (issue 11, item 10) ----------------------------------------
def _result_obj(**face_changes: Any) -> dict[str, Any]:
    obj = make_result().to_dict()
    obj["faces"][0].update(face_changes)
    return obj


def _ts(**changes: Any) -> dict[str, Any]:
    obj = make_result().to_dict()
    obj["timestamps"].update(changes)
    return obj


INF, NAN = float("inf"), float("nan")
LMS = [[1.0, 2.0]] * 5


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (_result_obj(box=[INF, 0.0, 10.0, 10.0]), "box is not finite"),
        (_result_obj(box=[0.0, 0.0, 1e300, 10.0]), "out of range"),
        (_result_obj(box=[0.0, 0.0, -5.0, 10.0]), "negative size"),
        (_result_obj(box=[0.0, 0.0, "10", 10.0]), "not a number"),
        (_result_obj(box=[0.0, 0.0, True, 10.0]), "not a number"),
        (_result_obj(landmarks=[{"x": 1, "y": 2}] * 5), "landmark must be a list of 2"),
        (_result_obj(landmarks=[[1.0, 2.0, 3.0]] * 5), "landmark must be a list of 2"),
        (_result_obj(landmarks=[[NAN, 2.0]] * 5), "landmark is not finite"),
        (_result_obj(landmarks=LMS[:4]), "landmarks 5 points"),
        (_result_obj(score=NAN), "not finite"),
        (_result_obj(probs={"female": NAN}), "probability is not finite"),
        (_result_obj(probs={"female": 7.0}), "out of range"),
        (_result_obj(probs={"x" * 300: 0.5}), "class names"),
        (_result_obj(label="x" * 1000), "longer than"),
        (_ts(captured=NAN), "timestamp 'captured' is not finite"),
        (_ts(published=INF), "timestamp 'published' is not finite"),
        (_ts(read="1.5"), "not a number"),
        ({**make_result().to_dict(), "timestamps": {"captured": 1.0}}, "timestamps lack"),
        ({**make_result().to_dict(), "model": {"name": {"a": 1}, "version": "v1"}}, "'name' has type dict"),
        ({**make_result().to_dict(), "seq": -3}, "negative seq"),
        (
            {**make_result().to_dict(), "faces": [make_result().to_dict()["faces"][0]] * (MAX_FACES + 1)},
            "exceeds",
        ),
    ],
)
def test_results_with_non_finite_numbers_or_wrong_shapes_are_refused(
    obj: dict[str, Any], reason: str
) -> None:
    with pytest.raises(SchemaError) as info:
        Result.from_fields({FIELD: msgpack.packb(obj, use_bin_type=True)})
    assert reason in info.value.reason


def test_every_number_a_result_carries_is_finite() -> None:
    back = Result.from_fields(make_result().to_fields())
    numbers = [*back.timestamps.stages_ms().values()]
    for face in back.faces:
        numbers += [*face.box, face.score, *face.probs.values(), *(v for p in face.landmarks for v in p)]
    assert numbers and all(math.isfinite(v) for v in numbers)


@pytest.mark.parametrize(
    ("message", "field", "value"),
    [
        (CameraInfo("cam-1", "video.mp4", 15.0, "live", 1.0, 2.0), "fps", float("nan")),
        (CameraInfo("cam-1", "video.mp4", 15.0, "live", 1.0, 2.0), "updated_at", float("inf")),
        (Event("error", "worker-1", "x", 4.0), "at", float("nan")),
        (ModelEvent("gendernet", "v2", "gendernet-v2", 3.0), "at", float("-inf")),
    ],
)
def test_other_messages_refuse_non_finite_numbers(message: Any, field: str, value: float) -> None:
    obj = message.to_dict()
    obj[field] = value
    packed = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(SchemaError, match="not finite"):
        if isinstance(message, CameraInfo):
            CameraInfo.unpack(packed)
        else:
            type(message).from_fields({FIELD: packed})
