"""The figures the API and the WebSocket report, built from the in-memory state in one place: a
camera's row (``/api/cameras``, the WebSocket's ``stats`` and ``cameras`` messages), the model
status (``/api/model`` and the ``model`` part of ``/api/stats``) and the WebSocket's ``stats``
message.
"""

from __future__ import annotations

import time
from typing import Any

from services.viewer import metrics as M
from services.viewer.palette import class_colours
from services.viewer.schemas import (
    CameraOut,
    ClassColour,
    EventOut,
    ModelAnnouncement,
    ModelName,
    ModelStatus,
)
from services.viewer.settings import ViewerSettings
from services.viewer.state import COUNTS_MAX_AGE_S, CameraView, ViewerState
from shared.constants import NO_MODEL_COUNT, UNCERTAIN


def camera_out(view: CameraView, state: ViewerState, settings: ViewerSettings, now: float) -> CameraOut:
    info = view.info
    age = view.last_frame_age_s(now)
    shown = view.shown
    counts = view.counts(COUNTS_MAX_AGE_S, now)
    fps = view.frame_rate.rate()
    M.CAMERA_FPS.labels(view.camera_id).set(fps)
    return CameraOut(
        id=view.camera_id,
        name=view.camera_id,
        source=info.source if info else None,
        status=view.status(state.redis_ok, settings.no_signal_after_s, now),
        capture_status=info.status if info else None,
        fps=round(fps, 2),
        target_fps=info.fps if info else None,
        results_fps=round(view.result_rate.rate(), 2),
        last_frame_age_ms=round(age * 1000, 1) if age is not None else None,
        faces=counts["faces"],
        counts=counts,
        latency_ms=round(shown.latency_ms, 1) if shown else None,
        inference=view.inference_live(COUNTS_MAX_AGE_S, now),
        latest_seq=view.latest_result.seq if view.latest_result else None,
        stream_url=f"/cameras/{view.camera_id}/stream.mjpg",
    )


def cameras_out(state: ViewerState, settings: ViewerSettings) -> list[CameraOut]:
    now = time.time()
    return [camera_out(v, state, settings, now) for _, v in sorted(state.cameras.items())]


def cameras_message(state: ViewerState, settings: ViewerSettings) -> dict[str, Any]:
    """The WebSocket's ``cameras`` message (sent when the list changes, e.g. after a DELETE)."""
    return {"type": "cameras", "cameras": [c.model_dump() for c in cameras_out(state, settings)]}


def model_status(state: ViewerState) -> ModelStatus:
    refused = state.refused_events()
    return ModelStatus(
        current=ModelName.model_validate(state.model) if state.model else None,
        # one uncertainty policy: the threshold the newest result's worker applied (the model's own
        # unless overridden), which the smoothed labels use too
        uncertain_threshold=state.uncertain_threshold,
        classes=[ClassColour.model_validate(c) for c in class_colours(state.classes)],
        announced=ModelAnnouncement.model_validate(state.model_event) if state.model_event else None,
        refused=EventOut.model_validate(refused[-1]) if refused else None,
    )


def stats_message(state: ViewerState, settings: ViewerSettings) -> dict[str, Any]:
    """The WebSocket's ``stats`` message, once a second: cameras, totals, mean stage latency, model,
    workers, refused models."""
    totals: dict[str, int] = {"faces": 0, **dict.fromkeys(state.classes, 0), UNCERTAIN: 0, NO_MODEL_COUNT: 0}
    stages: dict[str, list[float]] = {}
    for view in state.cameras.values():
        for name, count in view.counts(COUNTS_MAX_AGE_S).items():
            totals[name] = totals.get(name, 0) + count
        if view.latest_result is not None:
            for stage, ms in view.latest_result.timestamps.stages_ms().items():
                stages.setdefault(stage, []).append(ms)
    return {
        "type": "stats",
        "at": time.time(),
        "redis": "ok" if state.redis_ok else "reconnecting",
        "cameras": [c.model_dump() for c in cameras_out(state, settings)],
        "totals": totals,
        "stages_ms": {k: round(sum(v) / len(v), 1) for k, v in stages.items()},
        "model": state.model,
        "classes": class_colours(state.classes),  # the page's count rows, in the model's order
        "workers": len(state.workers),
        "worker_list": state.workers,
        "refused": state.refused_events()[-5:],
        "blur": settings.blur_faces,
        "uncertain_threshold": state.uncertain_threshold,  # the model's (from the newest result)
    }
