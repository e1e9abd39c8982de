"""Operations: liveness, readiness (the reader reaches Redis) and Prometheus metrics. ``/healthz`` and
``/readyz`` stay open when a token is set (``auth.TokenAuth``), for probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.viewer import metrics as M
from services.viewer.deps import StateDep
from services.viewer.schemas import Health, Readiness

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: the reader reaches Redis",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: the reader cannot reach Redis."}},
)
async def readyz(state: StateDep) -> JSONResponse:
    ready = state.redis_ok
    body = Readiness(status="ready" if ready else "not ready", redis="ok" if ready else "reconnecting")
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
)
async def metrics(state: StateDep) -> Response:
    for view in state.cameras.values():
        M.CAMERA_FPS.labels(view.camera_id).set(view.frame_rate.rate())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
