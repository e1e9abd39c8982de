"""Wire schema: round trips, and every kind of bad input is a SchemaError with a reason."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from shared.schema import (
    FIELD,
    MAX_MESSAGE_BYTES,
    CameraInfo,
    Event,
    Face,
    Frame,
    ModelEvent,
    ModelRef,
    Result,
    SchemaError,
    Timestamps,
)

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16


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
