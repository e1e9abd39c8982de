"""What the viewer knows, in memory only: per-camera ring buffers of recent frames, the latest results
paired with their frames, tracks, and the figures the page shows. Nothing is written to disk.

The reader task is the only writer; request handlers read. Everything runs on one event loop, so no
locks are needed; waiters are woken through a per-camera ``asyncio.Event`` that is replaced on every
change (whoever holds the old one is woken exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from services.viewer import metrics as M
from services.viewer.appearance import Signature
from services.viewer.tracker import FaceTracker, TrackedFace, threshold_of
from shared.constants import NO_MODEL, NO_MODEL_COUNT, UNCERTAIN
from shared.schema import CameraInfo, Event, Frame, ModelRef, Result

#: Camera status values the page and API show.
CameraStatus = Literal["live", "no_signal", "reconnecting"]
LIVE: Final = "live"
NO_SIGNAL: Final = "no_signal"
RECONNECTING: Final = "reconnecting"
#: Show raw frames with a "no inference" note when the newest annotated frame lags the newest frame
#: by more than this: results are not coming (no worker, or workers far behind).
NO_INFERENCE_AFTER_S = 1.5
#: Counts of faces in view are those of the newest result while results keep coming (no older than
#: this); after that the page shows none, not the last ones as if they were current.
COUNTS_MAX_AGE_S = NO_INFERENCE_AFTER_S * 2


def classes_of(result: Result) -> tuple[str, ...]:
    """The class names of the model behind a result, in the model's order (its metadata, which the
    result carries), or from its faces' probabilities (workers older than ``ModelRef.classes``);
    empty without a model."""
    if result.model is None:
        return ()
    if result.model.classes:
        return result.model.classes
    return next((tuple(face.probs) for face in result.faces if face.probs), ())


@dataclass(frozen=True, slots=True)
class BufferedFrame:
    entry_id: str
    frame: Frame
    received_at: float  #: wall clock when the viewer read it


@dataclass(frozen=True, slots=True)
class Shown:
    """A frame and the result that belongs to it, with its tracked faces: what gets drawn."""

    frame: BufferedFrame
    result: Result
    faces: tuple[TrackedFace, ...]
    received_at: float  #: when the result reached the viewer

    @property
    def latency_ms(self) -> float:
        """End to end: capture -> result in the viewer's hands."""
        return (self.received_at - self.result.timestamps.captured) * 1000


class RateMeter:
    """Events per second over a sliding window (frames received, results received)."""

    def __init__(self, window_s: float = 3.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], 1e-3)
        return (len(self._times) - 1) / span if span < self.window_s else len(self._times) / self.window_s


@dataclass
class CameraView:
    camera_id: str
    buffer_size: int
    tracker: FaceTracker
    info: CameraInfo | None = None
    alive: bool = False  #: heartbeat key present
    frames: deque[BufferedFrame] = field(default_factory=deque)
    shown: Shown | None = None
    latest_result: Result | None = None
    latest_faces: tuple[TrackedFace, ...] = ()
    latest_result_at: float = 0.0
    last_frame_at: float = 0.0  #: wall clock of the newest frame (capture time when seeded at start)
    frame_rate: RateMeter = field(default_factory=RateMeter)
    result_rate: RateMeter = field(default_factory=RateMeter)
    frames_seen: int = 0
    results_seen: int = 0
    unpaired_results: int = 0
    #: most faces of one result that are tracked and drawn (the highest detector scores are kept)
    max_faces: int = 128
    #: faces left out by that cap, since the viewer started
    faces_dropped: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.frames = deque(maxlen=self.buffer_size)

    # -- change notification -----------------------------------------------------------------------
    def notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change; take it *before* looking at the state to never miss one."""
        return self._changed

    # -- writers (reader task) ---------------------------------------------------------------------
    def add_frame(self, entry_id: str, frame: Frame, received_at: float, live: bool = True) -> None:
        """``live=False`` for frames read back from history at start-up: they fill the buffer but
        must not count towards the frame rate (they all arrive at once)."""
        self.frames.append(BufferedFrame(entry_id, frame, received_at))
        self.last_frame_at = max(self.last_frame_at, received_at)
        if live:
            self.frame_rate.tick()
        self.frames_seen += 1
        self.notify()

    def trim(self, result: Result) -> Result:
        """The result with at most ``max_faces`` faces (the best detector scores, in their original
        order): a crowd, or a worker gone wrong, must not make tracking and drawing unbounded."""
        extra = len(result.faces) - self.max_faces
        if extra <= 0:
            return result
        keep = sorted(range(len(result.faces)), key=lambda i: -result.faces[i].score)[: self.max_faces]
        self.faces_dropped += extra
        M.FACES_DROPPED.labels(self.camera_id).inc(extra)
        return replace(result, faces=tuple(result.faces[i] for i in sorted(keep)))

    def add_result(
        self,
        result: Result,
        received_at: float,
        signatures: Sequence[Signature | None] | None = None,
    ) -> tuple[TrackedFace, ...]:
        result = self.trim(result)
        changes = self.tracker.identity_changes
        faces = tuple(self.tracker.update(result, signatures))
        if self.tracker.identity_changes > changes:
            M.IDENTITY_CHANGES.labels(self.camera_id).inc(self.tracker.identity_changes - changes)
        self.results_seen += 1
        self.result_rate.tick()
        if self.latest_result is None or result.seq >= self.latest_result.seq:
            self.latest_result, self.latest_faces, self.latest_result_at = result, faces, received_at
        frame = self.find_frame(result.frame_id, result.seq)
        if frame is None:
            self.unpaired_results += 1  # its frame already left the ring buffer (or was never seen)
        elif self.shown is None or result.seq > self.shown.result.seq or self._restarted(result):
            self.shown = Shown(frame, result, faces, received_at)
            self.notify()
        return faces

    def _restarted(self, result: Result) -> bool:
        return self.shown is not None and result.seq < self.shown.result.seq - 1000

    def find_frame(self, frame_id: str, seq: int) -> BufferedFrame | None:
        for item in reversed(self.frames):
            if item.entry_id == frame_id:
                return item
        return None

    def clear_frames(self) -> None:
        self.frames.clear()
        self.shown = None
        self.notify()

    # -- readers -----------------------------------------------------------------------------------
    @property
    def latest_frame(self) -> BufferedFrame | None:
        return self.frames[-1] if self.frames else None

    def last_frame_age_s(self, now: float | None = None) -> float | None:
        if not self.last_frame_at:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_frame_at)

    def status(self, redis_ok: bool, no_signal_after_s: float, now: float | None = None) -> CameraStatus:
        if not redis_ok:
            return RECONNECTING
        age = self.last_frame_age_s(now)
        if (
            not self.alive
            or self.info is None
            or self.info.status != LIVE
            or age is None
            or age > no_signal_after_s
        ):
            return NO_SIGNAL
        return LIVE

    def inference_live(self, max_age_s: float, now: float | None = None) -> bool:
        """Results are coming: the newest arrived less than ``max_age_s`` ago."""
        now = time.time() if now is None else now
        return self.latest_result_at > 0 and now - self.latest_result_at < max_age_s

    def counts(self, max_age_s: float | None = None, now: float | None = None) -> dict[str, int]:
        """Faces in view by shown label (from the newest result): ``faces``, each class of its model
        (in the model's order), ``uncertain``, and ``no_model`` when there are such faces. With
        ``max_age_s``: all zero once that result is older (no worker left, or workers far behind),
        instead of the last counts standing as if they were current."""
        faces = self.latest_faces
        if max_age_s is not None and not self.inference_live(max_age_s, now):
            faces = ()
        classes = classes_of(self.latest_result) if self.latest_result is not None else ()
        counts: dict[str, int] = {"faces": len(faces), **dict.fromkeys(classes, 0), UNCERTAIN: 0}
        for face in faces:
            key = face.label if face.label != NO_MODEL else NO_MODEL_COUNT
            counts[key] = counts.get(key, 0) + 1
        return counts


def model_name(model: ModelRef) -> dict[str, Any]:
    return {"name": model.name, "version": model.version}


class Subscribers:
    """Fan-out of JSON messages to WebSocket clients. Each has a small bounded queue; a slow client
    loses its oldest messages instead of holding up the reader or growing memory."""

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.maxsize)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(queue)

    def __len__(self) -> int:
        return len(self._queues)

    def publish(self, message: dict[str, Any]) -> None:
        for queue in self._queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(message)


@dataclass
class ViewerState:
    frame_buffer: int
    max_faces: int = 128
    max_tracks: int = 256
    cameras: dict[str, CameraView] = field(default_factory=dict)
    redis_ok: bool = False
    redis_error: str | None = None
    ever_connected: bool = False
    events: deque[tuple[str, Event]] = field(default_factory=lambda: deque(maxlen=50))
    workers: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] | None = None  #: model seen in the newest result of any camera
    #: the uncertainty threshold that newest result's worker applied (what the smoothed labels use)
    uncertain_threshold: float | None = None
    #: that model's class names, in its order (``classes_of``)
    classes: tuple[str, ...] = ()
    model_event: dict[str, Any] | None = None  #: newest announcement on the model events stream
    subscribers: Subscribers = field(default_factory=Subscribers)
    #: camera id -> when its removal was requested (from the camera requests stream, any viewer)
    removed_at: dict[str, float] = field(default_factory=dict)
    #: set on SIGTERM/SIGINT (``stop_streams``): endless responses (MJPEG, WebSocket) end
    stopping: bool = False

    def stop_streams(self) -> None:
        """Called by the server on SIGTERM/SIGINT: endless MJPEG responses and WebSockets end
        (within 0.5 s) instead of holding graceful shutdown until its timeout."""
        self.stopping = True

    def note_model(self, result: Result) -> None:
        """The model shown is the one behind the newest result ("none" while workers have none)."""
        model = result.model
        same = self.model is not None and model is not None and self.model == model_name(model)
        self.model = model_name(model) if model else None
        self.uncertain_threshold = threshold_of(result) if model else None
        # A result without faces from an older worker does not say its classes: keep the model's.
        self.classes = classes_of(result) or (self.classes if same else ())

    def camera(self, camera_id: str) -> CameraView:
        view = self.cameras.get(camera_id)
        if view is None:
            tracker = FaceTracker(max_tracks=self.max_tracks)
            view = CameraView(camera_id, self.frame_buffer, tracker, max_faces=self.max_faces)
            self.cameras[camera_id] = view
        return view

    def is_removed(self, info: CameraInfo) -> bool:
        """A registry entry older than the camera's removal: written by the capture process that was
        being stopped (it registers itself once more as "stopped" on its way out). A capture started
        after the removal (the camera added again) is newer, and shown."""
        removed = self.removed_at.get(info.camera_id)
        return removed is not None and info.started_at <= removed

    def remove_camera(self, camera_id: str) -> None:
        view = self.cameras.pop(camera_id, None)
        if view is not None:
            view.notify()  # wakes its streams so they notice the camera is gone and end

    def refused_events(self) -> list[dict[str, Any]]:
        return [
            {"id": eid, **ev.to_dict()}
            for eid, ev in self.events
            if ev.message.startswith("refused model") or "refused" in ev.message
        ]
