"""Unit tests of the viewer's IoU tracker and label smoothing, on synthetic results."""

from __future__ import annotations

import itertools
import random

from services.viewer.tracker import NO_MODEL, UNCERTAIN, FaceTracker, iou
from shared.schema import Face, ModelRef, Result, Timestamps

LANDMARKS = ((0.0, 0.0),) * 5


def face(box: tuple[float, float, float, float], p_female: float | None) -> Face:
    if p_female is None:
        return Face(box=box, landmarks=LANDMARKS, score=0.9, label="unknown", probs={})
    probs = {"female": p_female, "male": 1 - p_female}
    label = max(probs, key=lambda k: probs[k])
    if probs[label] < 0.6:
        label = UNCERTAIN
    return Face(box=box, landmarks=LANDMARKS, score=0.9, label=label, probs=probs)


def result(seq: int, faces: list[Face], model: bool = True) -> Result:
    t = 1000.0 + seq / 15
    return Result(
        camera_id="cam",
        seq=seq,
        frame_id=f"{seq}-0",
        width=640,
        height=480,
        timestamps=Timestamps(t, t + 0.01, t + 0.02, t + 0.03, t + 0.04),
        model=ModelRef("m", "1") if model else None,
        worker="w",
        faces=tuple(faces),
    )


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert abs(iou((0, 0, 10, 10), (5, 0, 10, 10)) - 50 / 150) < 1e-9


def test_two_moving_faces_keep_their_track_ids() -> None:
    tracker = FaceTracker()
    ids: list[tuple[int, int]] = []
    for seq in range(60):
        a = face((100 + seq, 100, 80, 80), 0.9)
        b = face((400 - seq, 120, 90, 90), 0.1)
        out = tracker.update(result(seq, [b, a] if seq % 2 else [a, b]))
        by_x = sorted(out, key=lambda f: f.box[0])
        ids.append((by_x[0].track_id, by_x[1].track_id))
    assert len(set(ids)) == 1, "track ids changed while the faces moved smoothly"
    assert ids[0][0] != ids[0][1]


def test_out_of_order_results_match_and_never_move_a_box_back() -> None:
    tracker = FaceTracker()
    order = [0, 2, 1, 4, 3, 6, 5, 8, 7, 9]  # what two workers finishing alternately look like
    seen = set()
    for seq in order:
        out = tracker.update(result(seq, [face((100 + 3 * seq, 100, 80, 80), 0.85)]))
        seen.add(out[0].track_id)
    assert len(seen) == 1
    assert tracker.tracks[0].box[0] == 100 + 3 * 9  # newest seq's box, not the last to arrive
    assert tracker.tracks[0].last_seq == 9


def test_smoothing_removes_flicker_and_keeps_the_majority_label() -> None:
    rng = random.Random(7)
    raw = FaceTracker(smooth=False)
    smooth = FaceTracker()
    raw_labels, shown = [], []
    for seq in range(300):
        # A face that is "female" on average (0.75) with per-frame noise that crosses 0.5 sometimes.
        p = min(0.99, max(0.01, 0.75 + rng.gauss(0, 0.2)))
        raw_labels.append(raw.update(result(seq, [face((200, 150, 100, 100), p)]))[0].label)
        shown.append(smooth.update(result(seq, [face((200, 150, 100, 100), p)]))[0].label)

    def changes(labels: list[str]) -> int:
        return sum(a != b for a, b in itertools.pairwise(labels))

    assert changes(raw_labels) > 30
    assert changes(shown) <= 2
    assert shown[-1] == "female"


def test_low_smoothed_confidence_is_uncertain() -> None:
    tracker = FaceTracker(uncertain_threshold=0.7)
    for seq in range(20):
        p = 0.45 if seq % 2 else 0.62
        out = tracker.update(result(seq, [face((10, 10, 50, 50), p)]))
    assert out[0].label == UNCERTAIN
    assert 0.5 <= out[0].confidence < 0.7


def test_hysteresis_needs_a_margin_to_leave_uncertain() -> None:
    tracker = FaceTracker(uncertain_threshold=0.6, hysteresis=0.05)
    out = tracker.update(result(0, [face((10, 10, 50, 50), 0.62)]))
    assert out[0].label == UNCERTAIN  # 0.62 < 0.6 + 0.05
    out = tracker.update(result(1, [face((10, 10, 50, 50), 0.9)]))
    assert out[0].label == "female"  # mean 0.76
    out = tracker.update(result(2, [face((10, 10, 50, 50), 0.3)]))
    assert out[0].label == "female"  # mean 0.607 stays above the threshold itself


def test_no_model_faces_are_labelled_no_model() -> None:
    tracker = FaceTracker()
    out = tracker.update(result(0, [face((10, 10, 50, 50), None)], model=False))
    assert out[0].label == NO_MODEL
    assert out[0].confidence == 0.0


def test_tracks_expire_and_a_restarted_camera_resets_tracks() -> None:
    tracker = FaceTracker(max_gap=5)
    first = tracker.update(result(0, [face((10, 10, 50, 50), 0.9)]))[0].track_id
    later = tracker.update(result(20, [face((10, 10, 50, 50), 0.9)]))[0].track_id
    assert later != first  # the old track expired after 5 frames without a match
    tracker.update(result(5000, [face((10, 10, 50, 50), 0.9)]))
    again = tracker.update(result(0, [face((10, 10, 50, 50), 0.9)]))  # capture restarted at seq 0
    assert len(tracker.tracks) == 1
    assert again[0].track_id not in (first, later)


def test_a_new_face_far_away_gets_a_new_track() -> None:
    tracker = FaceTracker()
    a = tracker.update(result(0, [face((10, 10, 50, 50), 0.9)]))[0].track_id
    out = tracker.update(result(1, [face((11, 10, 50, 50), 0.9), face((300, 300, 50, 50), 0.1)]))
    assert out[0].track_id == a
    assert out[1].track_id != a
