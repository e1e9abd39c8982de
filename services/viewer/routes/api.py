"""The REST API: cameras (list, add, remove), each camera's newest result, frame accounting, the
model and recent events. Every reply has a response model (``schemas.py``); a Redis error in any of
these routes is a 503 (``deps.redis_unavailable``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from redis.exceptions import ResponseError

from services.viewer import metrics as M
from services.viewer.deps import CameraId, ReaderDep, RedisDep, RendererDep, SettingsDep, StateDep, ViewDep
from services.viewer.schemas import (
    CameraAdd,
    CameraOut,
    CameraRequestAccepted,
    CameraStats,
    EventOut,
    LatestResult,
    ModelStatus,
    Stats,
    WorkerOut,
    responses,
)
from services.viewer.settings import ViewerSettings
from services.viewer.summary import cameras_message, cameras_out, model_status
from shared import constants as C
from shared.credentials import redact_url, seal
from shared.schema import CameraRequest
from shared.sources import SourceError, SourceNotAllowedError, check_source, parse_source

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")


def _entry_id(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# -- cameras ---------------------------------------------------------------------------------------
@router.get("/cameras", tags=["cameras"], summary="Every camera with its status and live figures")
async def list_cameras(state: StateDep, settings: SettingsDep) -> list[CameraOut]:
    return cameras_out(state, settings)


async def checked_add_request(body: CameraAdd, settings: ViewerSettings) -> CameraRequest:
    """Check a source sent to the API before anything acts on it, and build the request for `up`.

    A file or folder must lie inside ``source_dirs`` (403 otherwise, the same answer whether or not
    the path exists) and be something capture can play (422 otherwise); a stream needs an allowed
    scheme; a webcam must exist. Credentials in a stream URL never reach Redis in the clear: the
    request carries the URL masked, and the real one sealed for `up` (``camera_request_key``)."""
    if not settings.allow_camera_control:
        raise HTTPException(403, "camera control is disabled (GENDERLENS_ALLOW_CAMERA_CONTROL)")
    try:
        spec = parse_source(body.source, allowed_dirs=settings.source_dirs)
        await asyncio.to_thread(check_source, spec)
    except SourceNotAllowedError as exc:
        raise HTTPException(403, str(exc)) from None
    except SourceError as exc:
        raise HTTPException(422, str(exc)) from None
    camera_id = body.camera_id or spec.default_camera_id
    if not C.is_valid_camera_id(camera_id):
        raise HTTPException(422, f"invalid camera id (must match {C.CAMERA_ID_RE.pattern})")
    sealed = ""
    if spec.has_credentials:
        key = settings.camera_request_key
        if key is None:
            raise HTTPException(
                422,
                "a source with credentials can only be added through a viewer started by `genderlens "
                "up`, which seals them; or give it to `genderlens up` (GENDERLENS_SOURCES) instead",
            )
        sealed = seal(spec.target, key.get_secret_value())
    # Files and folders travel as the resolved path that was checked; URLs masked.
    source = redact_url(spec.target) if spec.kind == "stream" else spec.target
    return CameraRequest(action="add", camera_id=camera_id, source=source, at=time.time(), sealed=sealed)


@router.post(
    "/cameras",
    tags=["cameras"],
    status_code=202,
    summary="Ask the supervisor (genderlens up) to start capturing a new source",
    responses=responses(403, 409, 422, 503),
)
async def add_camera(body: CameraAdd, settings: SettingsDep, redis: RedisDep) -> CameraRequestAccepted:
    request = await checked_add_request(body, settings)
    if await redis.hexists(C.CAMERAS_KEY, request.camera_id):
        raise HTTPException(409, f"camera {request.camera_id!r} already exists")
    entry_id = await redis.xadd(
        C.CAMERA_REQUESTS_STREAM, request.to_fields(), maxlen=C.CAMERA_REQUESTS_MAXLEN, approximate=True
    )
    log.info("requested camera %s from %s", request.camera_id, request.source)
    return CameraRequestAccepted(
        camera_id=request.camera_id,
        action="add",
        request_id=_entry_id(entry_id),
        detail="requested; the camera appears once its capture process publishes frames",
    )


@router.delete(
    "/cameras/{camera_id}",
    tags=["cameras"],
    status_code=202,
    summary="Remove a camera: stop its capture (via the supervisor) and drop it from the wall",
    responses=responses(403, 404, 422, 503),
)
async def remove_camera(
    camera_id: CameraId, state: StateDep, settings: SettingsDep, renderer: RendererDep, redis: RedisDep
) -> CameraRequestAccepted:
    if not settings.allow_camera_control:
        raise HTTPException(403, "camera control is disabled (GENDERLENS_ALLOW_CAMERA_CONTROL)")
    known = await redis.hexists(C.CAMERAS_KEY, camera_id)
    if not known and camera_id not in state.cameras:
        raise HTTPException(404, f"no camera {camera_id!r}")
    request = CameraRequest(action="remove", camera_id=camera_id, source="", at=time.time())
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(
        C.CAMERA_REQUESTS_STREAM, request.to_fields(), maxlen=C.CAMERA_REQUESTS_MAXLEN, approximate=True
    )
    pipe.hdel(C.CAMERAS_KEY, camera_id)
    pipe.delete(C.camera_heartbeat_key(camera_id))
    entry_id, *_ = await pipe.execute()
    state.removed_at[camera_id] = request.at
    state.remove_camera(camera_id)
    renderer.forget(camera_id)
    state.subscribers.publish(cameras_message(state, settings))
    log.info("removed camera %s", camera_id)
    return CameraRequestAccepted(
        camera_id=camera_id,
        action="remove",
        request_id=_entry_id(entry_id),
        detail="removed from the wall; capture stop requested",
    )


@router.get(
    "/cameras/{camera_id}/latest",
    tags=["results"],
    summary="The newest result of a camera, with tracked and smoothed labels",
    responses=responses(404, 422),
)
async def latest(view: ViewDep) -> LatestResult:
    result = view.latest_result
    if result is None:
        raise HTTPException(404, f"no result yet for {view.camera_id!r}")
    return LatestResult.model_validate(
        {
            **result.to_dict(),
            "received_at": view.latest_result_at,
            "age_ms": round((time.time() - view.latest_result_at) * 1000, 1),
            "latency_ms": round((view.latest_result_at - result.timestamps.captured) * 1000, 1),
            "stages_ms": {k: round(v, 2) for k, v in result.timestamps.stages_ms().items()},
            "tracks": [f.to_dict() for f in view.latest_faces],
            "counts": view.counts(),
        }
    )


# -- stats, model, events --------------------------------------------------------------------------
async def camera_stats(redis: Any, camera_ids: list[str]) -> dict[str, CameraStats]:
    """Each camera's accounting counters and pending frames, in one pipeline. A camera whose stats
    key is unusable gets an ``error`` in its row instead of failing the reply."""
    pipe = redis.pipeline(transaction=False)
    for camera_id in camera_ids:
        pipe.hgetall(C.stats_key(camera_id))
        pipe.xpending(C.frames_stream(camera_id), C.INFERENCE_GROUP)
    replies: list[Any] = await pipe.execute(raise_on_error=False) if camera_ids else []
    rows: dict[str, CameraStats] = {}
    for i, camera_id in enumerate(camera_ids):
        counters, pending = replies[2 * i], replies[2 * i + 1]
        row: dict[str, Any] = {f: 0 for f in (*C.STAT_FIELDS, *C.STAT_EXTRA_FIELDS)}
        if isinstance(counters, ResponseError):  # this camera's key is broken, not the others'
            row["error"] = str(counters)[:200]
            counters = {}
        elif isinstance(counters, Exception):
            raise counters
        for k, v in (counters or {}).items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            if name in row:
                with contextlib.suppress(ValueError):
                    row[name] = int(v)
        # NOGROUP (no worker has created the group yet) simply means nothing is pending.
        row["pending"] = int(pending.get("pending", 0)) if isinstance(pending, dict) else 0
        if isinstance(pending, Exception) and not isinstance(pending, ResponseError):
            raise pending
        M.PENDING.labels(camera_id).set(row["pending"])
        rows[camera_id] = CameraStats.model_validate(row)
    return rows


@router.get(
    "/stats",
    tags=["stats"],
    summary="Frame accounting per camera, live workers, model",
    responses=responses(503),
)
async def stats(state: StateDep, redis: RedisDep, reader: ReaderDep) -> Stats:
    cameras = await camera_stats(redis, sorted(state.cameras))
    workers = await reader.read_workers()
    return Stats(
        cameras=cameras,
        workers=[WorkerOut.model_validate(w) for w in workers],
        model=model_status(state),
        redis="ok" if state.redis_ok else "reconnecting",
    )


@router.get("/model", tags=["stats"], summary="The model behind the newest results, and refusals")
async def model(state: StateDep) -> ModelStatus:
    return model_status(state)


@router.get("/events", tags=["stats"], summary="Recent operational events (refused models, ...)")
async def events(state: StateDep) -> list[EventOut]:
    return [EventOut.model_validate({"id": eid, **ev.to_dict()}) for eid, ev in state.events]
