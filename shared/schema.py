"""The wire schema: every message that crosses Redis, in one module, used by every service.

Each message is a frozen dataclass packed with msgpack (never pickle) into one stream field
``FIELD`` (``to_fields``) and unpacked with ``from_fields``, which validates everything it reads and
raises :class:`SchemaError` with a reason on anything wrong, so a worker can dead-letter the message
instead of crashing. Pixels travel as JPEG bytes.
"""

from __future__ import annotations

import math
import struct
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
#: The most pixels any service decodes (4096 x 4096: 48 MiB as BGR). A JPEG's frame header is read
#: before decoding (``check_jpeg``), so a decompression bomb (a tiny file that declares 30000x30000)
#: is refused without allocating for it; capture's frames are far below (1280 px wide by default).
MAX_PIXELS: Final = 4096 * 4096
#: Most faces in one result: more than a frame can show legibly, and the viewer's tracker is quadratic
#: in it. The worker keeps the highest-scoring ones.
MAX_FACES: Final = 256
#: Box and landmark coordinates are pixels of a frame of at most MAX_DIMENSION a side; detections may
#: stick out of the frame a little, never this far (and C drawing code must never see a huge number).
MAX_COORDINATE: Final = 2.0 * MAX_DIMENSION
#: Class names, labels, worker and model names: short strings; most classes per face.
MAX_NAME_CHARS: Final = 200
MAX_CLASSES: Final = 64
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


def _number(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite int or float (never bool) within [lo, hi], as float; SchemaError otherwise. Every
    number that reaches a renderer, a JSON encoder or a tracker goes through here: NaN becomes
    invalid JSON, infinity an OverflowError in drawing code."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(f"{what} is {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise SchemaError(f"{what} is not finite")
    if not lo <= number <= hi:
        raise SchemaError(f"{what} {number:g} is out of range [{lo:g}, {hi:g}]")
    return number


def _numbers(value: Any, n: int, what: str, lo: float, hi: float) -> tuple[float, ...]:
    """Exactly ``n`` numbers in a list (msgpack turns tuples into lists)."""
    if not isinstance(value, list | tuple) or len(value) != n:
        raise SchemaError(f"{what} must be a list of {n} numbers")
    return tuple(_number(v, what, lo, hi) for v in value)


def _name(obj: Mapping[str, Any], key: str, kind: str) -> str:
    value = _req(obj, key, str, kind)
    if len(value) > MAX_NAME_CHARS:
        raise SchemaError(f"{kind}: {key!r} longer than {MAX_NAME_CHARS} characters")
    return str(value)


def _class_names(value: Any) -> tuple[str, ...]:
    """A model's class names: at most MAX_CLASSES short, distinct strings."""
    what = "result: model.classes"
    if not isinstance(value, list | tuple) or len(value) > MAX_CLASSES:
        raise SchemaError(f"{what} must be a list of at most {MAX_CLASSES} names")
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in value):
        raise SchemaError(f"{what}: names must be short, non-empty strings")
    if len(set(value)) != len(value):
        raise SchemaError(f"{what}: names must be distinct")
    return tuple(value)


def _camera_id(obj: Mapping[str, Any], kind: str) -> str:
    camera_id = _req(obj, "camera_id", str, kind)
    if not is_valid_camera_id(camera_id):
        raise SchemaError(f"{kind}: invalid camera_id {camera_id[:70]!r}")
    return str(camera_id)


def _dims(obj: Mapping[str, Any], kind: str) -> tuple[int, int]:
    width = _req(obj, "width", int, kind)
    height = _req(obj, "height", int, kind)
    if not dimensions_ok(width, height):
        raise SchemaError(f"{kind}: absurd dimensions {width}x{height}")
    return int(width), int(height)


def dimensions_ok(width: int, height: int) -> bool:
    """Within MAX_DIMENSION a side and MAX_PIXELS in all: what any service agrees to decode."""
    return 0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION and width * height <= MAX_PIXELS


#: JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: Markers without a length field.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding; raises ValueError with a reason.

    Read before decoding so that a decompression bomb (a tiny file declaring 60000x60000) or a
    truncated upload never reaches the decoder, which would allocate for it or quietly return a
    half-grey image."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise ValueError("corrupt JPEG: no start-of-image marker")
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ValueError("truncated JPEG: no end-of-image marker")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise ValueError("corrupt JPEG: scan data before any frame header")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise ValueError(f"corrupt JPEG: segment length {length}")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                raise ValueError("truncated JPEG: frame header cut short")
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
        pos += 2 + length
    raise ValueError("corrupt JPEG: no frame header")


def check_jpeg(data: bytes, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The one check every service runs before decoding a JPEG: well-formed markers, a frame header
    within ``dimensions_ok``, and (when given) exactly the declared ``width`` x ``height``. Returns
    the JPEG's (width, height); raises :class:`SchemaError` (a ValueError) with the reason."""
    try:
        jpeg_w, jpeg_h = jpeg_size(data)
    except ValueError as exc:
        raise SchemaError(str(exc)) from None
    if not dimensions_ok(jpeg_w, jpeg_h):
        raise SchemaError(
            f"absurd JPEG dimensions {jpeg_w}x{jpeg_h} "
            f"(limits: {MAX_DIMENSION} a side, {MAX_PIXELS} pixels in all)"
        )
    if width is not None and height is not None and (jpeg_w, jpeg_h) != (width, height):
        raise SchemaError(f"frame declares {width}x{height} but its JPEG is {jpeg_w}x{jpeg_h}")
    return jpeg_w, jpeg_h


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
    """One captured video frame. ``jpeg`` holds the encoded pixels; ``from_fields`` checks its frame
    header (``check_jpeg``) against ``width`` x ``height`` and the pixel bound, without decoding."""

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
        camera_id = _camera_id(obj, cls.KIND)
        captured_at = float(_req(obj, "captured_at", (float, int), cls.KIND))
        check_jpeg(jpeg, width, height)
        return cls(
            camera_id=camera_id,
            seq=int(seq),
            captured_at=captured_at,
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
        """Every number finite and in range, every shape exact (4 box numbers, 5 points of 2)."""
        if not isinstance(obj, dict):
            raise SchemaError("result: face is not a map")
        box = _req(obj, "box", list, "face")
        lms = _req(obj, "landmarks", list, "face")
        probs = _req(obj, "probs", dict, "face")
        if len(box) != 4 or len(lms) != len(LANDMARK_NAMES):
            raise SchemaError("face: box needs 4 numbers and landmarks 5 points")
        x, y, w, h = _numbers(box, 4, "face: box", -MAX_COORDINATE, MAX_COORDINATE)
        if w < 0 or h < 0:
            raise SchemaError("face: box has a negative size")
        lms_t = tuple(
            (p[0], p[1])
            for p in (_numbers(p, 2, "face: landmark", -MAX_COORDINATE, MAX_COORDINATE) for p in lms)
        )
        if len(probs) > MAX_CLASSES:
            raise SchemaError(f"face: more than {MAX_CLASSES} class probabilities")
        probs_d: dict[str, float] = {}
        for k, v in probs.items():
            if not isinstance(k, str) or len(k) > MAX_NAME_CHARS:
                raise SchemaError("face: class names must be short strings")
            probs_d[k] = _number(v, "face: probability", 0.0, 1.0)
        return cls(
            box=(x, y, w, h),
            landmarks=lms_t,
            score=_number(_req(obj, "score", (float, int), "face"), "face: score"),
            label=_name(obj, "label", "face"),
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
    #: The confidence below which this result's faces are labelled ``uncertain``: the model's own
    #: threshold (its metadata) or the worker's override. The viewer applies the same value to its
    #: smoothed labels, so the two never disagree. None from workers older than this field.
    uncertain_threshold: float | None = None
    #: The model's class names in its own order (its metadata), so a reader knows them, and their
    #: order, before any face is seen. Empty from workers older than this field (each face's
    #: ``probs`` names the classes in the same order).
    classes: tuple[str, ...] = ()


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
        model_ref: ModelRef | None = None
        if model is not None:
            if not (isinstance(model, dict) and {"name", "version"} <= model.keys()):
                raise SchemaError("result: model must be null or {name, version}")
            threshold = model.get("uncertain_threshold")
            model_ref = ModelRef(
                _name(model, "name", "result: model"),
                _name(model, "version", "result: model"),
                # None from workers older than this field; NaN and out-of-range are refused.
                None
                if threshold is None
                else _number(threshold, "result: model.uncertain_threshold", 0.0, 1.0),
                _class_names(model.get("classes", [])),
            )
        missing = [k for k in Timestamps.__dataclass_fields__ if k not in ts]
        if missing:
            raise SchemaError(f"result: timestamps lack {', '.join(missing)}")
        timestamps = Timestamps(
            **{k: _number(ts[k], f"result: timestamp {k!r}", 0.0) for k in Timestamps.__dataclass_fields__}
        )
        seq = _req(obj, "seq", int, cls.KIND)
        if seq < 0:
            raise SchemaError("result: negative seq")
        return cls(
            camera_id=_camera_id(obj, cls.KIND),
            seq=int(seq),
            frame_id=_name(obj, "frame_id", cls.KIND),
            width=width,
            height=height,
            timestamps=timestamps,
            model=model_ref,
            worker=_name(obj, "worker", cls.KIND),
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
