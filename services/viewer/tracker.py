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

A new face in the same place (a cut; one person leaves and another sits down) must not inherit the
previous person's smoothed label, so a matched face starts a new track when its identity changed:

- *appearance* (when the frame is at hand): the face's signature (``appearance.py``, a normalised grey
  thumbnail) is compared with the track's. At least ``appearance_threshold`` alike: the same face,
  unless its label is the other class at ``switch_confidence`` for ``switch_after`` frames in a row
  (two close-ups can look alike). Below ``appearance_change``: someone else. In between (a blurred
  frame, a turned head... or a look-alike): someone else if the face's own label is the other class
  at ``switch_confidence``, or after ``switch_after`` such frames in a row. On clips of the eval
  portraits consecutive frames of one face correlate above 0.63 (median 0.98), two people in the same
  place below 0.49; on clips of UTKFace training chips (faces filling the box) one face's frames
  correlate at median 0.99 (7 of 1,140 pairs below 0.6), but 6 of 59 cuts scored above 0.6, hence the
  class check on faces that look alike.
- *class probabilities* (when no signature can be compared): ``switch_after`` observations in a row
  each give the other class at least ``switch_confidence`` while the track shows a class.

The new track starts with the observations that showed the change, so it shows the new label at once.

Bounded work per result, so a crowd never stalls the viewer: matching is one vectorised IoU matrix
(faces x tracks) and a greedy pass over the pairs above the IoU threshold only, and a camera keeps at
most ``max_tracks`` tracks (the least recently seen go first). The caller caps faces per result.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from services.viewer.appearance import Signature, similarity
from shared.constants import NO_MODEL, UNCERTAIN, UNKNOWN
from shared.schema import Face, Result

#: For results that do not say which threshold their worker used (workers older than
#: ``ModelRef.uncertain_threshold``): the artifact format's default threshold.
DEFAULT_UNCERTAIN_THRESHOLD: Final = 0.6

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    return float(iou_matrix(np.array([a], np.float64), np.array([b], np.float64))[0, 0])


def iou_matrix(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4], (x, y, w, h) -> [N, M]."""
    ax1, ay1, aw, ah = (a[:, i : i + 1] for i in range(4))
    bx1, by1, bw, bh = (b[:, i] for i in range(4))
    iw = np.minimum(ax1 + aw, bx1 + bw) - np.maximum(ax1, bx1)
    ih = np.minimum(ay1 + ah, by1 + bh) - np.maximum(ay1, by1)
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = aw * ah + bw * bh - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.asarray(out, dtype=np.float64)


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
    #: appearance of the face in the newest frame matched (None: not known)
    signature: Signature | None = None
    #: the newest observations suggesting that another face took this place (see ``switch_after``)
    suspects: list[dict[str, float]] = field(default_factory=list)
    #: the track this one replaced in the same place (for results of that face arriving late)
    previous: Track | None = None


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
        max_tracks: int = 256,
        appearance_threshold: float = 0.6,
        appearance_change: float = 0.35,
        switch_after: int = 3,
        switch_confidence: float = 0.8,
        new_identity: bool = True,
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
        #: most tracks kept per camera; the least recently matched go first
        self.max_tracks = max_tracks
        #: signatures at least this alike are the same face
        self.appearance_threshold = appearance_threshold
        #: below this they are plainly different faces; in between it takes a contradicting label,
        #: or ``switch_after`` such observations in a row
        self.appearance_change = appearance_change
        self.switch_after = switch_after
        self.switch_confidence = switch_confidence
        #: False = keep a track whatever face it matches (today's behaviour before identity checks;
        #: used to measure what the checks change)
        self.new_identity = new_identity
        self.tracks: list[Track] = []
        self._next_id = 1
        self._newest_seq = -1
        #: tracks ended because another face took their place (appearance or probabilities)
        self.identity_changes = 0
        #: tracks dropped by the ``max_tracks`` cap
        self.evicted = 0

    def reset(self) -> None:
        self.tracks.clear()
        self._newest_seq = -1

    def update(
        self, result: Result, signatures: Sequence[Signature | None] | None = None
    ) -> list[TrackedFace]:
        """Track the faces of one result. ``signatures`` (one per face, from ``appearance.py``) let
        the tracker tell a new face in an old place; without them it goes by the class probabilities."""
        seq = result.seq
        if self._newest_seq >= 0 and seq < self._newest_seq - 10 * self.max_gap:
            # seq went far backwards: the capture process restarted and counts from 0 again.
            self.reset()
        self._newest_seq = max(self._newest_seq, seq)
        self.tracks = [t for t in self.tracks if self._newest_seq - t.last_seq <= self.max_gap]
        sigs: Sequence[Signature | None] = (
            signatures if signatures is not None else [None] * len(result.faces)
        )

        matched = self._match(result.faces, seq)
        threshold = threshold_of(result, self.uncertain_threshold)
        out: list[TrackedFace] = []
        for fi, face in enumerate(result.faces):
            track = matched.get(fi)
            sig = sigs[fi] if fi < len(sigs) else None
            if track is None:
                track = self._new_track(face.box, seq, sig)
            elif seq >= track.last_seq:
                if self.new_identity and self._identity_changed(track, face, sig):
                    # The new face's track starts with the observations that showed the change.
                    seed = [p for p in track.suspects if p is not face.probs]
                    self._retire(track)
                    track.previous = None  # one generation back is enough; memory stays bounded
                    track = self._new_track(face.box, seq, sig, previous=track)
                    track.probs.extend(seed)
                else:
                    track.box, track.last_seq = face.box, seq
                    if track.signature is None:
                        track.signature = sig
            elif (
                self.new_identity
                and sig is not None
                and track.signature is not None
                and similarity(sig, track.signature) < self.appearance_threshold
            ):
                # An older result (out of order) of another face, most likely the one that was here
                # before: it must not vote for this one, but for that one's track. (A late result
                # of the same face votes, but does not move the box back in time.)
                before = track.previous
                if (
                    before is not None
                    and before.signature is not None
                    and similarity(sig, before.signature) >= self.appearance_threshold
                ):
                    out.append(self._observe(before, face, threshold))
                else:
                    out.append(self._alone(track.track_id, face))
                continue
            out.append(self._observe(track, face, threshold))
        if len(self.tracks) > self.max_tracks:
            self.tracks.sort(key=lambda t: t.last_seq)
            self.evicted += len(self.tracks) - self.max_tracks
            del self.tracks[: len(self.tracks) - self.max_tracks]
        return out

    def _match(self, faces: Sequence[Face], seq: int) -> dict[int, Track]:
        """Greedy matching by IoU, best pairs first, over the pairs above the threshold only."""
        candidates = [t for t in self.tracks if abs(seq - t.last_seq) <= self.max_gap]
        if not faces or not candidates:
            return {}
        overlaps = iou_matrix(
            np.array([f.box for f in faces], np.float64), np.array([t.box for t in candidates], np.float64)
        )
        fis, tis = np.nonzero(overlaps >= self.iou_threshold)
        order = np.argsort(-overlaps[fis, tis], kind="stable")
        matched: dict[int, Track] = {}
        used: set[int] = set()
        for k in order:
            fi, ti = int(fis[k]), int(tis[k])
            if fi in matched or ti in used:
                continue
            matched[fi] = candidates[ti]
            used.add(ti)
        return matched

    def _new_track(self, box: Box, seq: int, sig: Signature | None, previous: Track | None = None) -> Track:
        track = Track(self._next_id, box, seq, deque(maxlen=self.window), signature=sig, previous=previous)
        self._next_id += 1
        self.tracks.append(track)
        return track

    def _retire(self, track: Track) -> None:
        self.identity_changes += 1
        self.tracks = [t for t in self.tracks if t is not track]

    def _identity_changed(self, track: Track, face: Face, sig: Signature | None) -> bool:
        """Whether ``face`` (in order, matched to ``track`` by position) is someone else. Observations
        that raise the suspicion are kept in ``track.suspects``: they seed the new track."""
        best, conf = _top(face.probs)
        contradicts = (
            track.label not in (UNCERTAIN, NO_MODEL)
            and bool(face.probs)
            and best != track.label
            and conf >= self.switch_confidence
        )
        # Suspicious: a sustained run of such observations (``switch_after``) means someone else.
        suspicious = contradicts  # no appearance to compare: a sudden change of the class probabilities
        if sig is not None and track.signature is not None:
            alike = similarity(sig, track.signature)
            if alike >= self.appearance_threshold:
                # The same face, unless it keeps getting the other label: two close-ups can look
                # alike (a look-alike replacing the face), so a contradiction counts once sustained.
                track.signature = sig
            elif alike < self.appearance_change or contradicts:
                return True  # plainly someone else, or looks different *and* gets the other label
            else:
                # Looks different, same verdict: a blurred frame, a turned head... or a look-alike.
                # Keep the signature of the face we know until the change has lasted.
                suspicious = True
        if not suspicious:
            track.suspects.clear()
            return False
        track.suspects.append(face.probs)
        return len(track.suspects) >= self.switch_after

    @staticmethod
    def _alone(track_id: int, face: Face) -> TrackedFace:
        raw_label = face.label
        raw_conf = face.probs.get(raw_label, _top(face.probs)[1]) if face.probs else 0.0
        return TrackedFace(
            track_id, face.box, face.score, raw_label, raw_conf, raw_label, raw_conf, face.probs
        )

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
