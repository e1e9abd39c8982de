"""Request and response models of the viewer's HTTP API: what ``/docs`` (OpenAPI) shows for every
reply, error replies included. Routes return these; FastAPI checks and serialises them.

Counts of faces are keyed by label: ``faces`` (all), each class of the model (in the model's order),
``uncertain`` and, when a worker has no model, ``no_model``; the class names come from the model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.viewer.state import CameraStatus

Counts = dict[str, int]


class Problem(BaseModel):
    """Every error reply of the viewer's own (``HTTPException``): a sentence saying what is wrong."""

    detail: str = Field(description="What is wrong, and what to do about it where that is known.")


class ValidationIssue(BaseModel):
    model_config = ConfigDict(extra="allow")  # FastAPI adds input and ctx

    loc: list[str | int] = Field(description="Where: body, path or query, then the field.")
    msg: str
    type: str


class ValidationProblem(BaseModel):
    """FastAPI's own reply to a request that fails validation (a body or parameter of the wrong shape):
    one entry per problem."""

    detail: list[ValidationIssue]


#: What each error status means in this API (the reply body is a :class:`Problem`).
ERRORS: dict[int, str] = {
    403: "Camera control is disabled (GENDERLENS_ALLOW_CAMERA_CONTROL), or a file or folder source "
    "lies outside GENDERLENS_SOURCE_DIRS (the same answer whether or not it exists).",
    404: "No such camera (or no result for it yet).",
    409: "A camera with this id exists already.",
    422: "A malformed camera id, or a source capture cannot play (the detail says why); a body or "
    "parameter of the wrong shape gets FastAPI's list of problems instead.",
    503: "Redis is unreachable, or the viewer is still starting; retry.",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error replies a route can give, from :data:`ERRORS`."""
    return {
        code: {"model": Problem | ValidationProblem if code == 422 else Problem, "description": ERRORS[code]}
        for code in codes
    }


# -- cameras ---------------------------------------------------------------------------------------
class CameraOut(BaseModel):
    id: str = Field(description="Camera id (a-z, 0-9, '-', '_').")
    name: str
    source: str | None = Field(description="Capture source spec, credentials masked.")
    status: CameraStatus
    capture_status: str | None = Field(description="What the capture process registered (live, ...).")
    fps: float = Field(description="Frames per second received.")
    target_fps: float | None = Field(description="The rate capture publishes at.")
    results_fps: float = Field(description="Results per second received.")
    last_frame_age_ms: float | None
    faces: int = Field(description="Faces in view (newest result; 0 once results stop coming).")
    counts: Counts = Field(description="Faces in view by label (see the module description).")
    latency_ms: float | None = Field(description="Capture to result, of the picture shown.")
    inference: bool = Field(description="Results are coming for this camera.")
    latest_seq: int | None
    stream_url: str


class CameraAdd(BaseModel):
    source: str = Field(
        ..., min_length=1, max_length=1000, description="Capture source spec (file, folder, rtsp://, 0)."
    )
    camera_id: str | None = Field(
        None, description="Camera id (a-z, 0-9, '-', '_'); derived from the source when omitted."
    )


class CameraRequestAccepted(BaseModel):
    camera_id: str
    action: Literal["add", "remove"]
    request_id: str = Field(description="Entry id of the request on genderlens:camera-requests.")
    detail: str


# -- results ---------------------------------------------------------------------------------------
class TimestampsOut(BaseModel):
    """Wall-clock seconds at each stage of the frame's trip."""

    captured: float
    read: float
    detected: float
    classified: float
    published: float


class ModelRefOut(BaseModel):
    name: str
    version: str
    uncertain_threshold: float | None = Field(
        description="Below this confidence the worker labelled a face uncertain (null: older worker)."
    )
    classes: list[str] = Field(description="The model's class names in its order (empty: older worker).")


class FaceOut(BaseModel):
    box: list[float] = Field(description="x, y, w, h in frame pixels.")
    landmarks: list[list[float]] = Field(description="Five (x, y) points, YuNet's order.")
    score: float = Field(description="Detector score.")
    label: str = Field(description="The worker's label for this frame: a class, uncertain or unknown.")
    probs: dict[str, float] = Field(description="Probability per class name (empty without a model).")


class TrackOut(BaseModel):
    track_id: int
    box: list[float]
    score: float
    label: str = Field(description="Smoothed over the track: a class, uncertain or 'no model'.")
    confidence: float
    raw_label: str = Field(description="The worker's label for this frame alone.")
    raw_confidence: float
    probs: dict[str, float] = Field(description="Smoothed probability per class name.")


class LatestResult(BaseModel):
    """The newest result message of a camera, as workers publish it, plus what the viewer made of it."""

    schema_version: int
    kind: Literal["result"]
    camera_id: str
    seq: int
    frame_id: str = Field(description="The frame's entry id on the camera's frames stream.")
    width: int
    height: int
    timestamps: TimestampsOut
    model: ModelRefOut | None
    worker: str
    faces: list[FaceOut]
    received_at: float = Field(description="When the viewer read it (wall clock).")
    age_ms: float
    latency_ms: float = Field(description="Capture to the viewer reading the result.")
    stages_ms: dict[str, float] = Field(description="queue, detect, classify, publish, total.")
    tracks: list[TrackOut]
    counts: Counts


# -- stats, model, events --------------------------------------------------------------------------
class EventOut(BaseModel):
    """An operational event (a refused model, an evicting Redis, ...)."""

    id: str = Field(description="Entry id on genderlens:events.")
    level: str
    source: str
    message: str
    at: float
    schema_version: int
    kind: Literal["event"]


class ModelName(BaseModel):
    name: str
    version: str


class ModelAnnouncement(ModelName):
    at: float


class ClassColour(BaseModel):
    name: str
    colour: str = Field(description="#RRGGBB, Okabe-Ito, by the class's index in the model's order.")


class ModelStatus(BaseModel):
    current: ModelName | None = Field(description="The model behind the newest result (null: none).")
    uncertain_threshold: float | None = Field(
        description="The threshold that result's worker applied; the smoothed labels use it too."
    )
    classes: list[ClassColour] = Field(
        description="That model's classes in its order, with the colour boxes and the page use."
    )
    announced: ModelAnnouncement | None = Field(description="Newest announcement on model-events.")
    refused: EventOut | None = Field(description="The latest refused-model event.")


class CameraStats(BaseModel):
    """Frame accounting of one camera (see docs/reliability.md)."""

    published: int
    processed: int
    dropped_stale: int
    evicted: int
    dead_lettered: int
    publish_failed: int
    dropped_stale_publish: int = Field(description="Of dropped_stale: result ready but already too old.")
    dropped_stale_predicted: int = Field(
        description="Of dropped_stale: dropped at read, its age plus the batch's expected time over the budget."
    )
    pending: int = Field(description="XPENDING of the inference group.")
    error: str | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Present when this camera's stats key is unusable (its counters then read 0).",
    )


class WorkerOut(BaseModel):
    name: str
    model: str | None
    processed: int
    heartbeat_age_s: float


class Stats(BaseModel):
    cameras: dict[str, CameraStats]
    workers: list[WorkerOut]
    model: ModelStatus
    redis: Literal["ok", "reconnecting"]


# -- operations ------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """The reader reaches Redis (200), or not (503, the same body)."""

    status: Literal["ready", "not ready"]
    redis: Literal["ok", "reconnecting"]
