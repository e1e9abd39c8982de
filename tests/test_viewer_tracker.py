"""Unit tests of the viewer's IoU tracker and label smoothing, on synthetic results."""

from __future__ import annotations

import itertools
import random
import time

import numpy as np

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


# -- a new face in the same place (issue #11 item 16) --------------------------------------------------
def _signature(seed: int) -> np.ndarray:
    """A face-like signature: a random 12x12 thumbnail, normalised as appearance.py does."""
    vec = np.random.default_rng(seed).normal(size=144).astype(np.float32)
    vec -= vec.mean()
    return vec / np.linalg.norm(vec)


def _jitter(sig: np.ndarray, seed: int, amount: float = 0.15) -> np.ndarray:
    noisy = sig + amount * _signature(seed)
    noisy -= noisy.mean()
    return (noisy / np.linalg.norm(noisy)).astype(np.float32)


def test_another_face_in_the_same_place_starts_a_new_track_at_once() -> None:
    """One person replaced by another in the same box: before, the track (and its smoothed label)
    carried over for about a second; the appearance signature ends it at the first frame."""
    tracker = FaceTracker()
    box = (200.0, 150.0, 100.0, 100.0)
    alice, bob = _signature(1), _signature(2)
    for seq in range(30):
        out = tracker.update(result(seq, [face(box, 0.95)]), [_jitter(alice, seq)])
    first = out[0].track_id
    assert out[0].label == "female"
    out = tracker.update(result(30, [face(box, 0.1)]), [_jitter(bob, 100)])
    assert out[0].track_id != first
    assert out[0].label == "male"  # the new face's own first observation, not the old average
    assert len(tracker.tracks) == 1 and tracker.identity_changes == 1
    for seq in range(31, 60):  # and it stays one track
        out = tracker.update(result(seq, [face(box, 0.1)]), [_jitter(bob, seq)])
        assert out[0].label == "male"
    assert len({t.track_id for t in tracker.tracks}) == 1 and tracker.identity_changes == 1


def test_same_face_with_noisy_appearance_keeps_its_track() -> None:
    tracker = FaceTracker()
    alice = _signature(1)
    ids = set()
    for seq in range(200):
        # Jitter (similarity about 0.9) and an occasional odd frame (about 0.5: a blur, a turned
        # head) that agrees with the label: never a new track.
        sig = _jitter(alice, seq, 1.5 if seq % 37 == 36 else 0.35)
        ids.add(tracker.update(result(seq, [face((200 + seq % 3, 150, 100, 100), 0.9)]), [sig])[0].track_id)
    assert len(ids) == 1 and tracker.identity_changes == 0


def test_without_appearance_a_sustained_switch_of_class_starts_a_new_track() -> None:
    tracker = FaceTracker(switch_after=3)
    box = (200.0, 150.0, 100.0, 100.0)
    for seq in range(30):
        first = tracker.update(result(seq, [face(box, 0.95)]))[0].track_id
    # One or two confident contrary frames are noise: same track, label held by the smoothing.
    for seq in (30, 31):
        out = tracker.update(result(seq, [face(box, 0.05)]))
        assert out[0].track_id == first and out[0].label == "female"
    out = tracker.update(result(32, [face(box, 0.9)]))
    assert out[0].track_id == first
    # Three in a row: someone else. The new track starts from those three observations.
    labels = [tracker.update(result(seq, [face(box, 0.05)]))[0] for seq in (33, 34, 35)]
    assert [f.track_id for f in labels[:2]] == [first, first]
    assert labels[2].track_id != first and labels[2].label == "male"
    assert len(tracker.tracks[0].probs) == 3


def test_a_look_alike_with_the_other_label_sustained_starts_a_new_track() -> None:
    """Close-ups: two faces filling the same box can have thumbnails that correlate like one face's
    (on a clip of UTKFace chips filmed in one place, 6 of 59 cuts scored at least 0.6). Appearance then
    says "same face", so a sustained, confident switch of class decides, as it does without a signature;
    one or two contrary frames of a face that looks the same stay noise."""
    tracker = FaceTracker(switch_after=3)
    box = (200.0, 150.0, 100.0, 100.0)
    alice = _signature(1)
    for seq in range(30):
        first = tracker.update(result(seq, [face(box, 0.95)]), [_jitter(alice, seq)])[0].track_id
    for seq in (30, 31):
        out = tracker.update(result(seq, [face(box, 0.05)]), [_jitter(alice, seq)])
        assert out[0].track_id == first and out[0].label == "female"
    out = tracker.update(result(32, [face(box, 0.9)]), [_jitter(alice, 32)])
    assert out[0].track_id == first
    labels = [tracker.update(result(s, [face(box, 0.05)]), [_jitter(alice, s)])[0] for s in (33, 34, 35)]
    assert [f.track_id for f in labels[:2]] == [first, first]
    assert labels[2].track_id != first and labels[2].label == "male"
    assert tracker.identity_changes == 1


def test_a_late_result_of_the_previous_face_does_not_vote_for_the_new_one() -> None:
    tracker = FaceTracker()
    box = (200.0, 150.0, 100.0, 100.0)
    alice, bob = _signature(1), _signature(2)
    for seq in range(20):
        tracker.update(result(seq, [face(box, 0.95)]), [_jitter(alice, seq)])
    new = tracker.update(result(21, [face(box, 0.1)]), [_jitter(bob, 21)])[0].track_id
    late = tracker.update(result(20, [face(box, 0.95)]), [_jitter(alice, 20)])  # out of order
    assert late[0].label == "female" and late[0].track_id != new  # shown as the previous face
    out = tracker.update(result(22, [face(box, 0.1)]), [_jitter(bob, 22)])
    assert out[0].track_id == new and out[0].probs["female"] < 0.2


def test_crowds_are_bounded_and_matching_is_cheap() -> None:
    rng = random.Random(3)
    tracker = FaceTracker(max_tracks=100)
    started = time.perf_counter()
    for seq in range(24):
        faces = [face((rng.uniform(0, 620), rng.uniform(0, 460), 16, 16), 0.5) for _ in range(128)]
        tracker.update(result(seq, faces))
    took = time.perf_counter() - started
    assert len(tracker.tracks) <= 100 and tracker.evicted > 0
    assert took < 5.0, f"24 results of 128 faces took {took:.1f}s"


def test_vectorised_iou_matches_the_scalar_definition() -> None:
    from services.viewer.tracker import iou_matrix

    rng = random.Random(5)
    boxes = [
        (rng.uniform(0, 100), rng.uniform(0, 100), rng.uniform(0, 50), rng.uniform(0, 50)) for _ in range(40)
    ]
    matrix = iou_matrix(np.array(boxes[:20]), np.array(boxes[20:]))
    for i, a in enumerate(boxes[:20]):
        for j, b in enumerate(boxes[20:]):
            iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
            ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
            inter = max(iw, 0) * max(ih, 0)
            union = a[2] * a[3] + b[2] * b[3] - inter
            assert abs(matrix[i, j] - (inter / union if union > 0 and inter > 0 else 0.0)) < 1e-9
