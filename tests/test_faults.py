"""The five fault tests of issue 4: real `genderlens capture` and `genderlens infer` processes on a
test-owned Redis (a throw-away server on a free port, so restarts and flushes never touch the shared
one), fed with real face photos. Each is bounded in time and stops everything it started.

Measured numbers (recovery times, counts) are printed as ``[fault-result]`` lines and appended to
``test-artifacts/fault-results.txt``.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import msgpack
import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared import constants as C
from shared.accounting import Accounting
from shared.redis_server import RedisServer
from shared.schema import MAX_MESSAGE_BYTES, CameraInfo, Result
from tests.helpers.accounting import accounting_report, consumer_pending, drained, log_result
from tests.helpers.artifacts import make_artifact, make_corrupt_artifact
from tests.helpers.net import free_port, metric_sample
from tests.helpers.paths import require_shared
from tests.helpers.photos import make_photo_folder
from tests.helpers.processes import GENDERLENS, Services, service_env
from tests.helpers.redis_servers import client_for, redis_binaries, throwaway_redis
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLAIM_IDLE_MS = 2000


def _processed(client: redis.Redis, camera_id: str) -> int:
    return int(client.hget(C.stats_key(camera_id), C.STAT_PROCESSED) or 0)


def _stop_captures_and_drain(svc: Services, client: redis.Redis, captures: dict[str, str]) -> None:
    for name in captures:
        assert svc.terminate(name) == 0, svc.log(name)[-2000:]
    wait_until(
        lambda: drained(client, list(captures.values())), 60, "workers to drain the streams", interval=0.25
    )


def _assert_equation(client: redis.Redis, camera_id: str) -> dict[str, int]:
    stats = accounting_report(client, camera_id)
    assert stats["unaccounted"] == 0, stats
    assert stats[C.STAT_PUBLISHED] == (
        stats[C.STAT_PROCESSED]
        + stats[C.STAT_DROPPED_STALE]
        + stats[C.STAT_EVICTED]
        + stats[C.STAT_DEAD_LETTERED]
    )
    return stats


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    require_shared()
    return make_photo_folder(tmp_path / "photos")


# -- 1 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", redis_binaries())
def test_1_kill_9_a_worker_mid_stream(
    binary: Path,
    tmp_path: Path,
    photos: Path,
    services: Services,
) -> None:
    with throwaway_redis(binary) as server:
        client = client_for(server)
        services.base_env = service_env(
            server.url,
            tmp_path / "models",
            GENDERLENS_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS),
            GENDERLENS_STALENESS_MS="1500",
            GENDERLENS_FRAMES_MAXLEN="8",
            GENDERLENS_BATCH_SIZE="4",
            GENDERLENS_MAX_WAIT_MS="50",
        )
        captures = {"capture-a": "cam-a", "capture-b": "cam-b"}
        # Captures first, and no worker until both capped streams have overflowed: frames are then
        # evicted for real, whatever the speed of this machine (a quiet one loads workers in a second).
        for name, camera_id in captures.items():
            services.capture(name, photos, camera_id, fps=8)
        wait_until(
            lambda: all(int(client.hget(C.stats_key(c), C.STAT_EVICTED) or 0) > 0 for c in captures.values()),
            60,
            "the capped streams to evict before any worker runs",
            interval=0.1,
        )
        services.worker("w1")
        services.worker("w2")
        with services.logs_on_failure():
            wait_until(
                lambda: all(_processed(client, c) >= 5 for c in captures.values()),
                90,
                "both cameras processed",
                interval=0.2,
            )
            streams = [C.frames_stream(c) for c in captures.values()]
            # Kill w1 while it holds delivered, unacked entries (mid-batch).
            held = wait_until(
                lambda: sum(consumer_pending(client, s, "w1") for s in streams),
                30,
                "w1 to hold entries",
                interval=0.005,
            )
            services.procs["w1"].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            services.procs["w1"].wait(10)
            wait_until(
                lambda: sum(consumer_pending(client, s, "w1") for s in streams) == 0,
                4 * CLAIM_IDLE_MS / 1000,
                "w1's pending entries to be claimed",
                interval=0.02,
            )
            claim_s = time.monotonic() - killed_at
            assert claim_s <= 2 * CLAIM_IDLE_MS / 1000, f"claimed after {claim_s:.2f}s"
            # Keep streaming on one worker for a while, then stop capture and let w2 drain.
            before = {c: _processed(client, c) for c in captures.values()}
            wait_until(
                lambda: all(_processed(client, c) > before[c] + 5 for c in captures.values()),
                60,
                "w2 to keep processing",
                interval=0.2,
            )
            _stop_captures_and_drain(services, client, captures)
            assert services.alive("w2")
            per_camera = {c: _assert_equation(client, c) for c in captures.values()}
            for stats in per_camera.values():
                assert stats[C.STAT_EVICTED] > 0, "the capped stream should have evicted while workers loaded"
                assert stats[C.STAT_PROCESSED] > 0
            assert services.terminate("w2") == 0
            log_result(
                f"test1[{binary.name}:{_version(client)}]",
                held_by_killed_worker=held,
                claimed_after_s=f"{claim_s:.2f}",
                claim_idle_s=CLAIM_IDLE_MS / 1000,
                **{f"{c}": _fmt(s) for c, s in per_camera.items()},
            )


def _metric(port: int, name: str, **labels: str) -> float:
    """One sample from a service's Prometheus /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return metric_sample(resp.read().decode(), name, **labels)


def _version(client: redis.Redis) -> str:
    info: Any = client.info("server")
    return str(info["redis_version"])


def _fmt(stats: dict[str, int]) -> str:
    keys = ("published", "processed", "dropped_stale", "evicted", "dead_lettered", "publish_failed")
    return "/".join(f"{k}:{stats[k]}" for k in keys)


# -- 2 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", redis_binaries())
def test_2_redis_restart_mid_stream(
    binary: Path,
    tmp_path: Path,
    photos: Path,
    services: Services,
) -> None:
    server = RedisServer(binary=binary).start()
    port = server.port
    try:
        client = client_for(server)
        services.base_env = service_env(
            server.url, tmp_path / "models", GENDERLENS_STALENESS_MS="1500", GENDERLENS_CLAIM_IDLE_MS="2000"
        )
        services.capture("capture", photos, "cam", fps=8)
        services.worker("w1")
        with services.logs_on_failure():
            wait_until(
                lambda: _processed(client, "cam") >= 5,
                90,
                "frames processed before the restart",
                interval=0.2,
            )
            before = accounting_report(client, "cam")
            client.close()
            down_at = time.monotonic()
            server.stop()
            time.sleep(3.0)  # an outage long enough for several retries
            server = RedisServer(port=port, binary=binary).start()
            up_at = time.monotonic()
            client = client_for(server)
            # Recovery: the first result of a frame published after the restart (the new Redis is empty).
            wait_until(
                lambda: client.xlen(C.results_stream("cam")) > 0,
                60,
                "a result after the restart",
                interval=0.02,
            )
            recovered_at = time.monotonic()
            assert services.alive("capture") and services.alive("w1"), services.dump_logs()
            assert client.hexists(C.CAMERAS_KEY, "cam"), "capture re-registered the camera"
            groups: Any = client.xinfo_groups(C.frames_stream("cam"))
            assert [g["name"] for g in groups] in ([C.INFERENCE_GROUP.encode()], [C.INFERENCE_GROUP])
            time.sleep(3.0)
            _stop_captures_and_drain(services, client, {"capture": "cam"})
            after = _assert_equation(client, "cam")
            assert after[C.STAT_PROCESSED] > 0
            assert services.terminate("w1") == 0
            for name in ("capture", "w1"):
                assert "redis unavailable" in services.log(name), f"{name} logged no retry"
            retries = {n: services.log(n).count("redis unavailable") for n in ("capture", "w1")}
            log_result(
                f"test2[{binary.name}:{_version(client)}]",
                outage_s=f"{up_at - down_at:.2f}",
                first_result_after_restart_s=f"{recovered_at - up_at:.2f}",
                first_result_after_outage_start_s=f"{recovered_at - down_at:.2f}",
                retry_log_lines=retries,
                before_restart=_fmt(before),
                after_restart=_fmt(after),
            )
    finally:
        server.stop()


# -- 3 --------------------------------------------------------------------------------------------------
def _hypothesis_garbage(n: int) -> list[bytes]:
    """n payloads from hypothesis: random bytes, random msgpack maps, frame-shaped maps with wrong
    values. None can be a valid frame (no valid JPEG with matching dimensions)."""
    ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
    values = st.one_of(
        st.none(), st.booleans(), ints, st.floats(), st.text(max_size=16), st.binary(max_size=32)
    )
    strategy = st.one_of(
        st.binary(min_size=1, max_size=256),
        st.dictionaries(st.text(max_size=10), values, max_size=6).map(
            lambda d: msgpack.packb(d, use_bin_type=True)
        ),
        st.fixed_dictionaries(
            {
                "schema_version": st.one_of(st.just(1), ints),
                "kind": st.sampled_from(["frame", "result", "camera"]),
                "camera_id": st.sampled_from(["cam", "other", "BAD ID", ""]),
                "seq": ints,
                "captured_at": st.floats(),
                "width": ints,
                "height": ints,
                "jpeg": st.binary(max_size=64).map(lambda b: b"\xff\xd8" + b),
            }
        ).map(lambda d: msgpack.packb(d, use_bin_type=True)),
    )
    out: list[bytes] = []

    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(payload=strategy)
    def collect(payload: bytes) -> None:
        out.append(payload)

    collect()
    return out


def _malformed(jpeg: bytes, width: int, height: int, n: int) -> list[tuple[str, dict[bytes, bytes]]]:
    def frame(**over: Any) -> dict[bytes, bytes]:
        obj: dict[str, Any] = {
            "schema_version": 1,
            "kind": "frame",
            "camera_id": "cam",
            "seq": 10**9,
            "captured_at": time.time(),
            "width": width,
            "height": height,
            "jpeg": jpeg,
        }
        obj.update(over)
        return {b"m": msgpack.packb(obj, use_bin_type=True)}

    fixed: list[tuple[str, dict[bytes, bytes]]] = []
    for i in range(100):
        fixed.append(("truncated_jpeg", frame(jpeg=jpeg[: 4 + (i * 997) % (len(jpeg) - 6)])))
        fixed.append(("corrupt_jpeg", frame(jpeg=b"\xff\xd8" + os.urandom(64 + i) + b"\xff\xd9")))
        fixed.append(("wrong_schema_version", frame(schema_version=2 + i)))
        fixed.append(("absurd_dimensions", frame(width=100_000 + i, height=3)))
        fixed.append(("non_msgpack", {b"m": b"\xc1" + os.urandom(32)}))
    fixed += [("huge_payload", {b"m": b"\x00" * (MAX_MESSAGE_BYTES + 1)}) for _ in range(3)]
    generated = [("hypothesis", {b"m": p}) for p in _hypothesis_garbage(n - len(fixed))]
    messages = fixed + generated
    while len(messages) < n:  # hypothesis may stop early on a small space; top up
        messages.append(("non_msgpack", {b"m": b"\xc1" + os.urandom(16)}))
    return messages[:n]


def test_3_a_thousand_malformed_messages_in_a_live_stream(
    tmp_path: Path,
    photos: Path,
    services: Services,
) -> None:
    with throwaway_redis() as server:
        client = client_for(server)
        services.base_env = service_env(
            server.url,
            tmp_path / "models",
            GENDERLENS_STALENESS_MS="60000",  # every good frame must get its result, however slow the CPU
            GENDERLENS_FRAMES_MAXLEN="5000",
        )
        services.capture("capture", photos, "cam", fps=5)
        services.worker("w1")
        with services.logs_on_failure():
            wait_until(lambda: _processed(client, "cam") >= 3, 90, "good frames processed", interval=0.2)
            sample = next(iter(sorted(photos.glob("*.jpg"))))
            image = cv2.imread(str(sample))
            jpeg = cv2.imencode(".jpg", image)[1].tobytes()
            messages = _malformed(jpeg, image.shape[1], image.shape[0], 1000)
            acc = Accounting(client)
            injected: dict[bytes, str] = {}
            started = time.time()
            for i in range(0, len(messages), 50):  # mixed into the live stream, in bursts
                for kind, fields in messages[i : i + 50]:
                    injected[acc.publish("cam", fields, 5000).entry_id] = kind
                time.sleep(0.1)
            wait_until(
                lambda: int(client.hget(C.stats_key("cam"), C.STAT_DEAD_LETTERED) or 0) >= 1000,
                120,
                "all malformed messages dead-lettered",
                interval=0.25,
            )
            # Good frames still get results after the flood.
            wait_until(
                lambda: any(
                    Result.from_fields(f).timestamps.captured > started + 1
                    for _, f in client.xrevrange(C.results_stream("cam"), count=5)
                ),
                60,
                "results for good frames after the flood",
                interval=0.25,
            )
            assert services.alive("w1"), services.log("w1")[-3000:]
            _stop_captures_and_drain(services, client, {"capture": "cam"})
            stats = _assert_equation(client, "cam")
            assert stats[C.STAT_DEAD_LETTERED] == 1000, stats
            reasons: dict[bytes, bytes] = {}
            for _, fields in client.xrange(C.DEADLETTER_STREAM):
                reasons[fields[b"id"]] = fields[b"reason"]
            assert set(injected) == set(reasons), "every injected message dead-lettered, nothing else"
            assert all(reasons.values()), "every dead letter carries a reason"
            by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            for entry_id, kind in injected.items():
                by_kind[kind][reasons[entry_id].decode().split(":")[0].split(" ")[0]] += 1
            assert services.terminate("w1") == 0
            log_result(
                "test3",
                injected=len(injected),
                kinds=dict(collections.Counter(injected.values())),
                counts=_fmt(stats),
            )


# -- 4 --------------------------------------------------------------------------------------------------
def _latest_model(client: redis.Redis) -> str | None:
    entries = client.xrevrange(C.results_stream("cam"), count=1)
    if not entries:
        return None
    result = Result.from_fields(entries[0][1])
    return result.model.version if result.model else "none"


def test_4_corrupt_model_then_valid_model_then_rollback(
    tmp_path: Path,
    photos: Path,
    services: Services,
) -> None:
    models = tmp_path / "models"
    make_artifact(models, "v1", "2026-01-01T00:00:00+00:00")
    with throwaway_redis() as server:
        client = client_for(server)
        services.base_env = service_env(
            server.url,
            models,
            GENDERLENS_STALENESS_MS="30000",  # a slow shared CPU must not drop frames: the swap must not
            GENDERLENS_FRAMES_MAXLEN="5000",
            GENDERLENS_RESULTS_MAXLEN="10000",
            GENDERLENS_MODEL_POLL_S="0.5",
        )
        services.capture("capture", photos, "cam", fps=5)
        services.worker("w1")
        with services.logs_on_failure():
            wait_until(lambda: _latest_model(client) == "v1", 90, "results from model v1", interval=0.2)
            make_corrupt_artifact(models, "v2", "2026-01-02T00:00:00+00:00", "truncated_weights")
            refused_at = time.time()

            def refused() -> bool:
                return any(
                    b"refused model gendernet-v2" in f[b"m"] for _, f in client.xrange(C.EVENTS_STREAM)
                )

            wait_until(refused, 30, "the corrupt model refused with an error event", interval=0.1)
            wait_until(
                lambda: any(
                    Result.from_fields(f).timestamps.read > refused_at + 1
                    for _, f in client.xrevrange(C.results_stream("cam"), count=3)
                ),
                30,
                "results after the refusal",
                interval=0.1,
            )
            assert _latest_model(client) == "v1", "the previous model keeps serving"
            make_artifact(models, "v3", "2026-01-03T00:00:00+00:00")
            wait_until(lambda: _latest_model(client) == "v3", 30, "results from model v3", interval=0.1)
            rollback = subprocess.run(
                [*GENDERLENS, "models", "rollback"],
                env={**os.environ, **services.base_env},
                capture_output=True,
                timeout=120,
                check=False,
            )
            assert rollback.returncode == 0, rollback.stderr.decode()[-2000:]
            assert b"current -> gendernet-v1" in rollback.stdout
            wait_until(
                lambda: _latest_model(client) == "v1", 30, "results from v1 after the rollback", interval=0.1
            )
            _stop_captures_and_drain(services, client, {"capture": "cam"})
            stats = _assert_equation(client, "cam")
            # Not a single frame dropped across the refusal and both swaps.
            assert stats[C.STAT_PROCESSED] == stats[C.STAT_PUBLISHED], stats
            assert stats[C.STAT_PUBLISH_FAILED] == 0, stats
            seqs = [Result.from_fields(f).seq for _, f in client.xrange(C.results_stream("cam"))]
            assert sorted(seqs) == list(range(stats[C.STAT_PUBLISHED])), "one result per published frame"
            versions = [
                (Result.from_fields(f).model or Any).version  # type: ignore[union-attr]
                for _, f in client.xrange(C.results_stream("cam"))
            ]
            assert "v2" not in versions
            assert services.terminate("w1") == 0
            log_result("test4", counts=_fmt(stats), served=dict(collections.Counter(versions)))


# -- 5 --------------------------------------------------------------------------------------------------
def test_5_sigterm_during_a_batch(
    tmp_path: Path,
    photos: Path,
    services: Services,
) -> None:
    with throwaway_redis() as server:
        client = client_for(server)
        services.base_env = service_env(
            server.url,
            tmp_path / "models",
            GENDERLENS_BATCH_SIZE="8",
            GENDERLENS_MAX_WAIT_MS="200",  # batches take a while to fill: a wide window to hit
            GENDERLENS_DRAIN_TIMEOUT_S="10",
        )
        metrics_port = free_port()
        services.capture("capture", photos, "cam", fps=15)
        worker = services.worker("w1", GENDERLENS_METRICS_PORT=str(metrics_port))
        stream = C.frames_stream("cam")
        with services.logs_on_failure():
            wait_until(lambda: _processed(client, "cam") >= 5, 90, "frames processed", interval=0.2)
            # The accounting outcomes and queue gauges are on the worker's /metrics.
            wait_until(
                lambda: _metric(
                    metrics_port, "genderlens_worker_frames_total", camera="cam", outcome="processed"
                ),
                10,
                "the processed counter on /metrics",
                interval=0.2,
            )
            wait_until(
                lambda: _metric(metrics_port, "genderlens_worker_stream_length", camera="cam"),
                10,
                "the stream-length gauge on /metrics",
                interval=0.2,
            )
            held = wait_until(
                lambda: consumer_pending(client, stream, "w1"), 30, "w1 holding a batch", interval=0.002
            )
            worker.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rc = worker.wait(10 + 5)
            exit_s = time.monotonic() - signalled
            assert rc == 0, services.log("w1")[-3000:]
            assert consumer_pending(client, stream, "w1") == 0
            consumers: Any = client.xinfo_consumers(stream, C.INFERENCE_GROUP)
            assert all(c["name"] not in ("w1", b"w1") for c in consumers), "w1 left the group"
            assert "stopped" in services.log("w1")
            log_result("test5", held_at_sigterm=held, exit_code=rc, exit_after_s=f"{exit_s:.2f}")


# -- camera loss (capture alone) -----------------------------------------------------------------------
def test_6_camera_loss_shows_no_signal_and_reconnects(
    tmp_path: Path,
    photos: Path,
    services: Services,
) -> None:
    """A looping folder source disappears: capture keeps running, marks the camera no_signal, retries
    with backoff, and goes live again when the source is back. /metrics shows it too."""
    with throwaway_redis() as server:
        client = client_for(server)
        metrics_port = free_port()
        services.base_env = service_env(
            server.url,
            tmp_path / "models",
            GENDERLENS_SLIDE_SECONDS="0.2",
            GENDERLENS_RECONNECT_MAX_S="1",
            GENDERLENS_METRICS_PORT=str(metrics_port),
        )
        services.capture("capture", photos, "cam", fps=10)

        def status() -> str | None:
            raw = client.hget(C.CAMERAS_KEY, "cam")
            return CameraInfo.unpack(raw).status if raw else None

        with services.logs_on_failure():
            wait_until(lambda: status() == "live", 30, "camera live", interval=0.1)
            assert _metric(metrics_port, "genderlens_capture_published_total", camera="cam") > 0
            unplugged = photos.with_name("unplugged")
            photos.rename(unplugged)
            lost_at = time.monotonic()
            wait_until(lambda: status() == "no_signal", 15, "camera shown as no_signal", interval=0.05)
            no_signal_s = time.monotonic() - lost_at
            assert _metric(metrics_port, "genderlens_capture_source_up", camera="cam") == 0
            published = int(client.hget(C.stats_key("cam"), C.STAT_PUBLISHED) or 0)
            time.sleep(1.5)
            assert services.alive("capture")
            unplugged.rename(photos)
            back_at = time.monotonic()
            wait_until(lambda: status() == "live", 15, "camera live again", interval=0.05)
            live_s = time.monotonic() - back_at
            wait_until(
                lambda: int(client.hget(C.stats_key("cam"), C.STAT_PUBLISHED) or 0) > published + 3,
                15,
                "frames flowing again",
                interval=0.1,
            )
            assert "retry" in services.log("capture")
            assert services.terminate("capture") == 0
            assert status() == "stopped"
            log_result(
                "camera-loss", no_signal_after_s=f"{no_signal_s:.2f}", live_again_after_s=f"{live_s:.2f}"
            )
