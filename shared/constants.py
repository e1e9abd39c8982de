"""Every Redis stream, group and key name in one place.

Per-camera names are built by the functions below so the format lives here only. Camera ids are
validated (``CAMERA_ID_RE``) before they are ever put into a key.
"""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "genderlens"

#: Camera ids: lowercase slug. Anything else is rejected before it reaches a key or a URL path.
CAMERA_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

#: Consumer group shared by all inference workers over every frames stream (work sharing).
INFERENCE_GROUP: Final = f"{PREFIX}:inference"

#: Hash camera_id -> msgpack CameraInfo, written by capture at start and on status changes.
CAMERAS_KEY: Final = f"{PREFIX}:cameras"
#: Stream of add/remove requests (msgpack ``CameraRequest``) that the viewer API writes and
#: `genderlens up` acts on (starts or stops a capture process); every viewer reads the removals.
CAMERA_REQUESTS_STREAM: Final = f"{PREFIX}:camera-requests"
CAMERA_REQUESTS_MAXLEN: Final = 1_000

#: Stream of messages that could not be processed (malformed or too many deliveries), with reasons.
DEADLETTER_STREAM: Final = f"{PREFIX}:deadletter"
DEADLETTER_MAXLEN: Final = 10_000

#: Stream on which the trainer / `genderlens models` announce a new current model version.
MODEL_EVENTS_STREAM: Final = f"{PREFIX}:model-events"
MODEL_EVENTS_MAXLEN: Final = 1_000

#: Stream of operational events (model refused, camera lost, ...) the viewer shows.
EVENTS_STREAM: Final = f"{PREFIX}:events"
EVENTS_MAXLEN: Final = 1_000

#: Hash of per-camera frame accounting counters (see ``stats_key``) fields:
STAT_PUBLISHED: Final = "published"
STAT_PUBLISH_FAILED: Final = "publish_failed"
STAT_PROCESSED: Final = "processed"
STAT_DROPPED_STALE: Final = "dropped_stale"
STAT_EVICTED: Final = "evicted"
STAT_DEAD_LETTERED: Final = "dead_lettered"
STAT_FIELDS: Final = (
    STAT_PUBLISHED,
    STAT_PROCESSED,
    STAT_DROPPED_STALE,
    STAT_EVICTED,
    STAT_DEAD_LETTERED,
)
#: Of ``dropped_stale``, those whose result was ready but already older than the staleness budget
#: (dropped at publish rather than at read): a breakdown, outside the accounting equation.
STAT_DROPPED_STALE_PUBLISH: Final = "dropped_stale_publish"
#: Of ``dropped_stale``, those dropped at read while still within the budget, because their age plus
#: the batch's expected processing time was over it (an overloaded worker): a breakdown too.
STAT_DROPPED_STALE_PREDICTED: Final = "dropped_stale_predicted"
#: Counters kept beside the equation's: never-published frames, and the breakdowns above.
STAT_EXTRA_FIELDS: Final = (STAT_PUBLISH_FAILED, STAT_DROPPED_STALE_PUBLISH, STAT_DROPPED_STALE_PREDICTED)

#: Worker heartbeat keys (``worker_key``) expire after this many seconds without a refresh.
WORKER_HEARTBEAT_TTL_S: Final = 10
#: Camera heartbeat keys expire after this many seconds without a published frame/attempt.
CAMERA_HEARTBEAT_TTL_S: Final = 10


def frames_stream(camera_id: str) -> str:
    return f"{PREFIX}:frames:{camera_id}"


def results_stream(camera_id: str) -> str:
    return f"{PREFIX}:results:{camera_id}"


def stats_key(camera_id: str) -> str:
    return f"{PREFIX}:stats:{camera_id}"


def camera_heartbeat_key(camera_id: str) -> str:
    return f"{PREFIX}:camera-alive:{camera_id}"


def worker_key(worker_name: str) -> str:
    return f"{PREFIX}:worker:{worker_name}"


WORKER_KEY_PATTERN: Final = f"{PREFIX}:worker:*"

# -- labels beside the model's own classes (no class may be named like these) --------------------
#: A face whose top class is below the uncertainty threshold (workers, and the viewer's smoothing).
UNCERTAIN: Final = "uncertain"
#: A face labelled by a worker that has no model.
UNKNOWN: Final = "unknown"
#: What the viewer shows for such a face ("unknown" would read as a verdict), and its key in counts.
NO_MODEL: Final = "no model"
NO_MODEL_COUNT: Final = "no_model"


def is_valid_camera_id(camera_id: str) -> bool:
    return bool(CAMERA_ID_RE.match(camera_id))
