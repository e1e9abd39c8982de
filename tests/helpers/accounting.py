"""What the fault tests read back from Redis (pending entries, drained streams, the accounting
equation), and where they record the figures they measure."""

from __future__ import annotations

import sys
import time
from typing import Any

import redis

from shared import constants as C
from shared.accounting import read_stats, unaccounted
from tests.helpers.paths import REPO


def consumer_pending(client: redis.Redis, stream: str, consumer: str) -> int:
    try:
        rows: Any = client.xpending_range(stream, C.INFERENCE_GROUP, "-", "+", 1000, consumername=consumer)
    except redis.ResponseError:
        return 0
    return len(rows)


def drained(client: redis.Redis, camera_ids: list[str]) -> bool:
    """True once every camera's stream has nothing pending and nothing undelivered."""
    for camera_id in camera_ids:
        stream = C.frames_stream(camera_id)
        info: Any = client.xinfo_stream(stream)
        groups: Any = client.xinfo_groups(stream)
        group = next(
            (g for g in groups if g["name"] in (C.INFERENCE_GROUP, C.INFERENCE_GROUP.encode())), None
        )
        if group is None or group["pending"]:
            return False
        last = info.get("last-entry")
        if info["length"] and last is not None and _id(group["last-delivered-id"]) < _id(last[0]):
            return False
    return True


def _id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def accounting_report(client: redis.Redis, camera_id: str) -> dict[str, int]:
    stats = read_stats(client, camera_id)
    stats["unaccounted"] = unaccounted(stats)
    return stats


def log_result(name: str, **values: Any) -> None:
    """Measured numbers go to stdout (pytest -s / -rP shows them) and to test-artifacts/ for notes."""
    line = f"[fault-result] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
    print(line)
    out = REPO / "test-artifacts"
    try:
        out.mkdir(exist_ok=True)
        with (out / "fault-results.txt").open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
    except OSError:
        pass
    sys.stdout.flush()
