"""Labels must not carry over to the next person (issue 11, item 16), measured on real pixels: a clip
of real portraits filmed one after another in the same place (``tools.flicker --cuts``), run through
the workers' pipeline with the shipped model, the faces signed from the JPEG frames as the viewer
signs them, then replayed through the viewer's tracker with and without its identity checks.

The tracker's unit tests (test_viewer_tracker.py) pin the rules on made-up inputs; this test shows
they hold on real detections, real class probabilities and real appearance signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from services.viewer.tracker import FaceTracker
from tests.helpers.paths import EVAL_DIR, REPO, WEIGHTS_DIR, skip_without
from tools.flicker import Flicker, make_clip, pick_photos, replay, results_from_clip

FPS = 10.0
SECONDS_PER_PHOTO = 2.0


@skip_without(EVAL_DIR, WEIGHTS_DIR)
def test_at_a_cut_the_new_person_gets_a_new_track_and_not_the_old_label(tmp_path: Path) -> None:
    photos = pick_photos(EVAL_DIR, 6, seed=3)  # female, male, female, ...: every cut changes the class
    clip = make_clip(
        photos, tmp_path / "cuts.avi", fps=FPS, seconds_per_photo=SECONDS_PER_PHOTO, same_place=True
    )
    results, signatures = results_from_clip(clip, REPO / "models", WEIGHTS_DIR, FPS)
    per_photo = round(FPS * SECONDS_PER_PHOTO)
    assert len(results) == per_photo * len(photos)
    truth = [path.parent.parent.name for path in photos]
    assert truth == ["female", "male"] * 3

    def run(new_identity: bool) -> Flicker:
        tracker = FaceTracker(new_identity=new_identity)
        return replay(results, tracker, FPS, signatures=signatures, truth=truth, frames_per_photo=per_photo)

    checked, unchecked = run(True), run(False)
    assert checked.cuts == unchecked.cuts == 5
    # Without the identity checks the previous person's label is shown on the new face for a while
    # after some cut (this is what the issue saw: 6 of 30 snapshots wrong with high confidence) ...
    assert unchecked.carried_over_s > 0.0, unchecked.to_dict()
    # ... with them, a new track starts at the cut: the old label is never shown on the new person.
    assert checked.carried_over_s == 0.0, checked.to_dict()
    assert checked.tracks >= len(photos), checked.to_dict()
    assert checked.wrong_after_cut_s < unchecked.wrong_after_cut_s, (checked.to_dict(), unchecked.to_dict())
