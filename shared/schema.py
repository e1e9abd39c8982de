"""The wire schema: every message that crosses Redis, in one module, used by every service.

Each message is a frozen dataclass packed with msgpack (never pickle) into one stream field
``FIELD`` (``to_fields``) and unpacked with ``from_fields``, which validates everything it reads and
raises :class:`SchemaError` with a reason on anything wrong, so a worker can dead-letter the message
instead of crashing. Pixels travel as JPEG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Final, Self

import msgpack

from shared.constants import is_valid_camera_id

SCHEMA_VERSION: Final = 1
#: The single stream-entry field holding the packed message.
FIELD: Final = b"m"
#: Hard limits: anything above is refused as malformed (a huge payload must not reach a decoder).
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
MAX_DIMENSION: Final = 8192
MAX_FACES: Final = 512
#: The five YuNet landmarks, in YuNet's order.
LANDMARK_NAMES: Final = ("right_eye", "left_eye", "nose", "right_mouth", "left_mouth")


class SchemaError(ValueError):
    """A message that cannot be decoded or fails validation; ``reason`` is short and loggable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack_fields(fields: Mapping[bytes, bytes] | Mapping[str, Any], kind: str) -> dict[str, Any]:
    raw = fields.get(FIELD) if FIELD in fields else fields.get(FIELD.decode())  # type: ignore[call-overload,unused-ignore]
    if raw is None:
        raise SchemaError(f"{kind}: missing field {FIELD.decode()!r}")
    if not isinstance(raw, bytes | bytearray):
        raise SchemaError(f"{kind}: field is {type(raw).__name__}, not bytes")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise SchemaError(f"{kind}: payload of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise SchemaError(f"{kind}: not msgpack ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise SchemaError(f"{kind}: payload is {type(obj).__name__}, not a map")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{kind}: unsupported schema_version {version!r} (expected {SCHEMA_VERSION})")
    if obj.get("kind") != kind:
        raise SchemaError(f"expected a {kind} message, got {obj.get('kind')!r}")
    return obj


def _req(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], kind: str) -> Any:
    if key not in obj:
        raise SchemaError(f"{kind}: missing {key!r}")
    value = obj[key]
    # bool is an int subclass; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SchemaError(f"{kind}: {key!r} has type bool")
    if not isinstance(value, types):
        raise SchemaError(f"{kind}: {key!r} has type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(f"{kind}: {key!r} is not finite")
    return value


def _camera_id(obj: Mapping[str, Any], kind: str) -> str:
    camera_id = _req(obj, "camera_id", str, kind)
    if not is_valid_camera_id(camera_id):
        raise SchemaError(f"{kind}: invalid camera_id {camera_id[:70]!r}")
    return str(camera_id)


def _dims(obj: Mapping[str, Any], kind: str) -> tuple[int, int]:
    width = _req(obj, "width", int, kind)
    height = _req(obj, "height", int, kind)
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise SchemaError(f"{kind}: absurd dimensions {width}x{height}")
    return int(width), int(height)


class _Message:
    KIND: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        data["schema_version"] = SCHEMA_VERSION
        data["kind"] = self.KIND
        return data

    def pack(self) -> bytes:
        return _pack(self.to_dict())

    def to_fields(self) -> dict[Any, Any]:
        """The stream entry for XADD (typed loosely: redis-py's field types are invariant dicts)."""
        return {FIELD: self.pack()}


@dataclass(frozen=True, slots=True)
class Frame(_Message):
    """One captured video frame. ``jpeg`` holds the encoded pixels."""

    KIND: ClassVar[str] = "frame"
    camera_id: str
    seq: int
    captured_at: float  #: wall-clock seconds (time.time()) at capture
    width: int
    height: int
    jpeg: bytes

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> Self:
        obj = _unpack_fields(fields, cls.KIND)
        width, height = _dims(obj, cls.KIND)
        jpeg = _req(obj, "jpeg", bytes, cls.KIND)
        if len(jpeg) < 4 or jpeg[:2] != b"\xff\xd8":
            raise SchemaError("frame: jpeg does not start with a JPEG marker")
        seq = _req(obj, "seq", int, cls.KIND)
        if seq < 0:
            raise SchemaError("frame: negative seq")
        return cls(
            camera_id=_camera_id(obj, cls.KIND),
            seq=int(seq),
            captured_at=float(_req(obj, "captured_at", (float, int), cls.KIND)),
            width=width,
            height=height,
            jpeg=bytes(jpeg),
        )


@dataclass(frozen=True, slots=True)
class Face:
    """One detected face in frame pixel coordinates.

    ``box`` is (x, y, w, h); ``landmarks`` the five points of ``LANDMARK_NAMES`` as (x, y);
    ``label`` a class name, ``"uncertain"`` below the confidence threshold or ``"unknown"`` with no
    model; ``probs`` the probability of each class (empty with no model).
    """

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float
    label: str
    probs: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_obj(cls, obj: Any) -> Face:
        if not isinstance(obj, dict):
            raise SchemaError("result: face is not a map")
        box = _req(obj, "box", list, "face")
        lms = _req(obj, "landmarks", list, "face")
        probs = _req(obj, "probs", dict, "face")
        try:
            box_t = tuple(float(v) for v in box)
            lms_t = tuple((float(p[0]), float(p[1])) for p in lms)
            probs_d = {str(k): float(v) for k, v in probs.items()}
        except (TypeError, ValueError, IndexError) as exc:
            raise SchemaError(f"face: bad numbers ({exc})") from exc
        if len(box_t) != 4 or len(lms_t) != len(LANDMARK_NAMES):
            raise SchemaError("face: box needs 4 numbers and landmarks 5 points")
        return cls(
            box=box_t,
            landmarks=lms_t,
            score=float(_req(obj, "score", (float, int), "face")),
            label=str(_req(obj, "label", str, "face")),
            probs=probs_d,
        )


@dataclass(frozen=True, slots=True)
class Timestamps:
    """Wall-clock seconds at each stage of one frame's trip through the system."""

    captured: float
    read: float
    detected: float
    classified: float
    published: float

    def stages_ms(self) -> dict[str, float]:
        return {
            "queue": (self.read - self.captured) * 1000,
            "detect": (self.detected - self.read) * 1000,
            "classify": (self.classified - self.detected) * 1000,
            "publish": (self.published - self.classified) * 1000,
            "total": (self.published - self.captured) * 1000,
        }


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Result(_Message):
    """What a worker found in one frame."""

    KIND: ClassVar[str] = "result"
    camera_id: str
    seq: int
    frame_id: str  #: the frame's stream entry id
    width: int
    height: int
    timestamps: Timestamps
    model: ModelRef | None
    worker: str
    faces: tuple[Face, ...]

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> Self:
        obj = _unpack_fields(fields, cls.KIND)
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Self:
        width, height = _dims(obj, cls.KIND)
        ts = _req(obj, "timestamps", dict, cls.KIND)
        faces = _req(obj, "faces", list, cls.KIND)
        if len(faces) > MAX_FACES:
            raise SchemaError(f"result: {len(faces)} faces exceeds {MAX_FACES}")
        model = obj.get("model")
        if model is not None and not (isinstance(model, dict) and {"name", "version"} <= model.keys()):
            raise SchemaError("result: model must be null or {name, version}")
        try:
            timestamps = Timestamps(**{k: float(ts[k]) for k in Timestamps.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"result: bad timestamps ({exc})") from exc
        return cls(
            camera_id=_camera_id(obj, cls.KIND),
            seq=int(_req(obj, "seq", int, cls.KIND)),
            frame_id=str(_req(obj, "frame_id", str, cls.KIND)),
            width=width,
            height=height,
            timestamps=timestamps,
            model=ModelRef(str(model["name"]), str(model["version"])) if model else None,
            worker=str(_req(obj, "worker", str, cls.KIND)),
            faces=tuple(Face.from_obj(f) for f in faces),
        )


@dataclass(frozen=True, slots=True)
class CameraInfo(_Message):
    """A camera as capture registers it (``CAMERAS_KEY``)."""

    KIND: ClassVar[str] = "camera"
    camera_id: str
    source: str
    fps: float
    status: str  #: "live" | "no_signal" | "stopped"
    started_at: float
    updated_at: float

    @classmethod
    def unpack(cls, raw: bytes) -> Self:
        obj = _unpack_fields({FIELD: raw}, cls.KIND)
        return cls(
            camera_id=_camera_id(obj, cls.KIND),
            source=str(_req(obj, "source", str, cls.KIND)),
            fps=float(_req(obj, "fps", (float, int), cls.KIND)),
            status=str(_req(obj, "status", str, cls.KIND)),
            started_at=float(_req(obj, "started_at", (float, int), cls.KIND)),
            updated_at=float(_req(obj, "updated_at", (float, int), cls.KIND)),
        )


@dataclass(frozen=True, slots=True)
class ModelEvent(_Message):
    """Announces that ``current`` now points at ``version`` (published by trainer / models CLI)."""

    KIND: ClassVar[str] = "model_event"
    name: str
    version: str
    path: str  #: directory name under the models dir
    at: float

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> Self:
        obj = _unpack_fields(fields, cls.KIND)
        return cls(
            name=str(_req(obj, "name", str, cls.KIND)),
            version=str(_req(obj, "version", str, cls.KIND)),
            path=str(_req(obj, "path", str, cls.KIND)),
            at=float(_req(obj, "at", (float, int), cls.KIND)),
        )


@dataclass(frozen=True, slots=True)
class Event(_Message):
    """An operational event for humans: level, source and a message (model refused, camera lost...)."""

    KIND: ClassVar[str] = "event"
    level: str
    source: str
    message: str
    at: float

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> Self:
        obj = _unpack_fields(fields, cls.KIND)
        return cls(
            level=str(_req(obj, "level", str, cls.KIND)),
            source=str(_req(obj, "source", str, cls.KIND)),
            message=str(_req(obj, "message", str, cls.KIND)),
            at=float(_req(obj, "at", (float, int), cls.KIND)),
        )


#: Actions a :class:`CameraRequest` may carry.
CAMERA_REQUEST_ACTIONS: Final = ("add", "remove")


@dataclass(frozen=True, slots=True)
class CameraRequest(_Message):
    """Asks the supervisor (``genderlens up``) to start or stop a capture process; written by the
    viewer API to ``CAMERA_REQUESTS_STREAM``. ``source`` is the capture source spec ("" for remove),
    with any credentials masked; ``sealed`` holds the whole spec sealed for ``up``
    (``shared.credentials.seal``) when it has credentials, else ""."""

    KIND: ClassVar[str] = "camera_request"
    action: str  #: "add" | "remove"
    camera_id: str
    source: str
    at: float
    sealed: str = ""

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> Self:
        obj = _unpack_fields(fields, cls.KIND)
        action = str(_req(obj, "action", str, cls.KIND))
        if action not in CAMERA_REQUEST_ACTIONS:
            raise SchemaError(f"{cls.KIND}: unknown action {action[:20]!r}")
        source = str(_req(obj, "source", str, cls.KIND))
        if action == "add" and not source.strip():
            raise SchemaError(f"{cls.KIND}: an add request needs a source")
        if len(source) > 4096:
            raise SchemaError(f"{cls.KIND}: source spec too long")
        sealed = obj.get("sealed", "")  # optional: requests written before it existed have none
        if not isinstance(sealed, str) or len(sealed) > 16384:
            raise SchemaError(f"{cls.KIND}: 'sealed' must be a string of at most 16384 characters")
        return cls(
            action=action,
            camera_id=_camera_id(obj, cls.KIND),
            source=source,
            at=float(_req(obj, "at", (float, int), cls.KIND)),
            sealed=sealed,
        )
