"""Per-camera IoU tracker with label smoothing, run on the viewer's side of the results stream.

Why here and not in the workers: the frames of one camera are spread over many workers (one consumer
group), so no worker sees consecutive frames; only a reader of the whole results stream can follow a
face from frame to frame. Results may also arrive out of order (worker A finishes frame 11 before worker
B finishes frame 10), so the tracker accepts an older ``seq``: it still matches the faces and adds their
probabilities to the track, but never moves a track's box backwards in time.

Smoothing: each track keeps the class probabilities of its last ``window`` observations; the label
shown is the arg-max of their mean (a soft vote, insensitive to the order they arrived in), and
``uncertain`` when that mean is below the uncertainty threshold. A small hysteresis (``hysteresis``) is
needed to *leave* ``uncertain`` or switch class, so a confidence hovering on the threshold does not
make the label blink.

One uncertainty policy: the threshold is the one the worker applied to the result's own labels, which
the result carries (``result.model.uncertain_threshold``: the model's threshold from its metadata, or
the worker's override), so the smoothed label and the per-frame label use the same value. Only results
from workers older than that field fall back to the tracker's ``uncertain_threshold``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from shared.schema import Face, Result

#: Labels the workers use (kept here so the viewer never imports torch through shared.models).
UNCERTAIN: Final = "uncertain"
UNKNOWN: Final = "unknown"
#: What the viewer shows for faces that come from a worker without a model.
NO_MODEL: Final = "no model"
#: For results that do not say which threshold their worker used (workers older than
#: ``ModelRef.uncertain_threshold``): the artifact format's default threshold.
DEFAULT_UNCERTAIN_THRESHOLD: Final = 0.6

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax2, ay2 = a[0] + a[2], a[1] + a[3]
    bx2, by2 = b[0] + b[2], b[1] + b[3]
    iw = min(ax2, bx2) - max(a[0], b[0])
    ih = min(ay2, by2) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TrackedFace:
    """One face of one result, as shown: the track it belongs to and its smoothed label."""

    track_id: int
    box: Box
    score: float
    label: str  #: smoothed label: a class, "uncertain" or "no model"
    confidence: float  #: smoothed probability of ``label``'s class (0 for "no model")
    raw_label: str  #: what the worker said for this frame alone
    raw_confidence: float
    probs: dict[str, float] = field(default_factory=dict)  #: smoothed probabilities

    def to_dict(self) -> dict[str, object]:
        return {
            "track_id": self.track_id,
            "box": list(self.box),
            "score": round(self.score, 4),
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "raw_label": self.raw_label,
            "raw_confidence": round(self.raw_confidence, 4),
            "probs": {k: round(v, 4) for k, v in self.probs.items()},
        }


@dataclass
class Track:
    track_id: int
    box: Box
    last_seq: int
    probs: deque[dict[str, float]]
    label: str = UNCERTAIN
    hits: int = 0


def threshold_of(result: Result, default: float = DEFAULT_UNCERTAIN_THRESHOLD) -> float:
    """The uncertainty threshold the result's worker applied (see the module doc)."""
    if result.model is not None and result.model.uncertain_threshold is not None:
        return result.model.uncertain_threshold
    return default


def _top(probs: dict[str, float]) -> tuple[str, float]:
    if not probs:
        return UNKNOWN, 0.0
    label = max(probs, key=lambda k: probs[k])
    return label, probs[label]


class FaceTracker:
    """IoU tracker for one camera. Feed it every result (:meth:`update`), in any order."""

    def __init__(
        self,
        uncertain_threshold: float = DEFAULT_UNCERTAIN_THRESHOLD,
        *,
        window: int = 15,
        iou_threshold: float = 0.3,
        max_gap: int = 30,
        hysteresis: float = 0.05,
        smooth: bool = True,
    ) -> None:
        #: used only for results that do not carry their worker's threshold (older workers)
        self.uncertain_threshold = uncertain_threshold
        self.window = window
        self.iou_threshold = iou_threshold
        #: a track not matched for this many frames (by seq) is dropped
        self.max_gap = max_gap
        self.hysteresis = hysteresis
        #: False = show the worker's per-frame label (used to measure flicker without smoothing)
        self.smooth = smooth
        self.tracks: list[Track] = []
        self._next_id = 1
        self._newest_seq = -1

    def reset(self) -> None:
        self.tracks.clear()
        self._newest_seq = -1

    def update(self, result: Result) -> list[TrackedFace]:
        seq = result.seq
        if self._newest_seq >= 0 and seq < self._newest_seq - 10 * self.max_gap:
            # seq went far backwards: the capture process restarted and counts from 0 again.
            self.reset()
        self._newest_seq = max(self._newest_seq, seq)
        self.tracks = [t for t in self.tracks if self._newest_seq - t.last_seq <= self.max_gap]

        # Greedy matching by IoU, best pairs first (enough for the few faces of one frame).
        pairs = sorted(
            (
                (iou(face.box, track.box), fi, ti)
                for fi, face in enumerate(result.faces)
                for ti, track in enumerate(self.tracks)
                if abs(seq - track.last_seq) <= self.max_gap
            ),
            reverse=True,
        )
        matched: dict[int, Track] = {}
        used: set[int] = set()
        for overlap, fi, ti in pairs:
            if overlap < self.iou_threshold:
                break
            if fi in matched or ti in used:
                continue
            matched[fi] = self.tracks[ti]
            used.add(ti)

        threshold = threshold_of(result, self.uncertain_threshold)
        out: list[TrackedFace] = []
        for fi, face in enumerate(result.faces):
            track = matched.get(fi)
            if track is None:
                track = Track(self._next_id, face.box, seq, deque(maxlen=self.window))
                self._next_id += 1
                self.tracks.append(track)
            elif seq >= track.last_seq:
                # An older result (out of order) adds its vote but must not move the box back in time.
                track.box, track.last_seq = face.box, seq
            out.append(self._observe(track, face, threshold))
        return out

    def _observe(self, track: Track, face: Face, threshold: float) -> TrackedFace:
        track.hits += 1
        raw_label = face.label
        raw_conf = face.probs.get(raw_label, _top(face.probs)[1]) if face.probs else 0.0
        if not face.probs or raw_label == UNKNOWN:
            # No model on the worker: nothing to smooth, and "unknown" would read as a verdict.
            track.label = NO_MODEL
            return TrackedFace(track.track_id, face.box, face.score, NO_MODEL, 0.0, raw_label, 0.0)
        if not self.smooth:
            return TrackedFace(
                track.track_id, face.box, face.score, raw_label, raw_conf, raw_label, raw_conf, face.probs
            )
        track.probs.append(face.probs)
        mean: dict[str, float] = {}
        for probs in track.probs:
            for cls, p in probs.items():
                mean[cls] = mean.get(cls, 0.0) + p / len(track.probs)
        best, conf = _top(mean)
        current = track.label
        if current == best:
            # Keep the class while it stays above the threshold itself.
            label = best if conf >= threshold else UNCERTAIN
        elif conf >= threshold + self.hysteresis:
            label = best  # switching (or leaving "uncertain") needs a clear margin
        elif current in mean and mean[current] >= threshold:
            label = current
        else:
            label = UNCERTAIN
        track.label = label
        shown_conf = mean.get(label, conf)
        return TrackedFace(track.track_id, face.box, face.score, label, shown_conf, raw_label, raw_conf, mean)
