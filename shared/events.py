"""Model events: telling running workers (and viewers) at once that ``current`` moved.

The pointer file in the models folder is the source of truth, and workers poll it anyway; the event on
``MODEL_EVENTS_STREAM`` only spares them the wait. So announcing is best effort: when Redis cannot be
reached the caller gets False and a warning, never an exception.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import redis

from shared.constants import MODEL_EVENTS_MAXLEN, MODEL_EVENTS_STREAM
from shared.schema import ModelEvent
from shared.streams import connect, redact_url

if TYPE_CHECKING:
    from shared.models.artifact import ModelMeta

log = logging.getLogger(__name__)


def announce_model(redis_url: str, meta: ModelMeta, *, timeout_s: float, client_name: str) -> bool:
    """XADD a :class:`~shared.schema.ModelEvent` for ``meta`` (now current) to the model-events
    stream, capped at its maxlen. True when it was added; False, with a warning, when Redis could not
    be reached in ``timeout_s``."""
    event = ModelEvent(name=meta.name, version=meta.version, path=meta.dirname, at=time.time())
    try:
        client = connect(redis_url, timeout_s=timeout_s, name=client_name)
        try:
            client.xadd(MODEL_EVENTS_STREAM, event.to_fields(), maxlen=MODEL_EVENTS_MAXLEN, approximate=True)
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        log.warning(
            "could not announce %s on %s (%s); it is in the models folder anyway, and workers pick it "
            "up at their next poll",
            meta.dirname,
            redact_url(redis_url),
            exc,
        )
        return False
    log.info("announced %s on %s", meta.dirname, MODEL_EVENTS_STREAM)
    return True
