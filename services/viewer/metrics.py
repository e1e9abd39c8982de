"""Prometheus metrics of the viewer (served at ``/metrics`` by the app itself)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FRAMES = Counter("genderlens_viewer_frames_total", "Frames read by the viewer", ["camera"])
RESULTS = Counter("genderlens_viewer_results_total", "Results read by the viewer", ["camera"])
BAD_MESSAGES = Counter("genderlens_viewer_bad_messages_total", "Malformed stream entries skipped", ["kind"])
LATENCY = Histogram(
    "genderlens_viewer_latency_seconds",
    "End to end: frame captured -> its result read by the viewer",
    buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
RENDER = Histogram(
    "genderlens_viewer_render_seconds",
    "Decode + draw + encode of one served frame",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
RENDER_ERRORS = Counter(
    "genderlens_viewer_render_errors_total", "Frames skipped because drawing them failed", ["camera"]
)
SERVED = Counter("genderlens_viewer_served_frames_total", "MJPEG parts sent to clients", ["camera"])
STREAM_CLIENTS = Gauge("genderlens_viewer_stream_clients", "Open MJPEG streams")
WS_CLIENTS = Gauge("genderlens_viewer_ws_clients", "Open WebSocket connections")
CAMERAS = Gauge("genderlens_viewer_cameras", "Cameras known to the viewer")
WORKERS = Gauge("genderlens_viewer_live_workers", "Inference workers with a live heartbeat")
REDIS_UP = Gauge("genderlens_viewer_redis_up", "1 while the viewer's reader reaches Redis")
CAMERA_FPS = Gauge("genderlens_viewer_camera_fps", "Frames per second received", ["camera"])
PENDING = Gauge("genderlens_viewer_pending_frames", "Frames pending in the inference group", ["camera"])
FACES_DROPPED = Counter(
    "genderlens_viewer_faces_dropped_total",
    "Faces left out of tracking and drawing by the per-result cap (max_faces)",
    ["camera"],
)
IDENTITY_CHANGES = Counter(
    "genderlens_viewer_identity_changes_total",
    "Tracks ended because another face took their place (new track started)",
    ["camera"],
)
AUTH_THROTTLED = Counter(
    "genderlens_viewer_auth_throttled_total", "Requests refused (429) after too many failed logins"
)
AUTH_FAILURES = Counter("genderlens_viewer_auth_failures_total", "Failed authentication attempts")
REFUSED = Counter(
    "genderlens_viewer_refused_requests_total", "Requests refused for their Host or Origin", ["reason"]
)
