"""``genderlens eval`` end to end on a handful of real photos with known labels, with the committed default
model (models/current)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from services.cli import main as cli_main
from shared.models.artifact import current_dir, load_artifact

SHARED = Path(__file__).resolve().parents[2] / "shared"
EVAL = SHARED / "data" / "faces" / "eval"
WEIGHTS = SHARED / "weights" / "yunet"
MODELS = Path(__file__).resolve().parents[1] / "models"

needs_shared = pytest.mark.skipif(
    not (EVAL / "manifest.csv").is_file() or not WEIGHTS.is_dir(),
    reason=f"needs the eval photos and YuNet weights in {SHARED} (present on developer machines and in CI)",
)
KEYS = {
    "images", "face_found_rate", "accuracy", "per_source", "per_class", "per_group", "per_age",
    "images_per_second", "model",
}  # fmt: skip


def test_committed_default_model_loads() -> None:
    art = current_dir(MODELS)
    assert art is not None, "models/current is missing: the default model must be committed"
    clf = load_artifact(art)
    assert clf.meta.classes == ["female", "male"]
    # The budget for the default artifact: whatever the backbone needs, up to 30 MB.
    assert (art / "model.safetensors").stat().st_size <= 30 * 1024 * 1024


def _subset(dest: Path, per_cell: int = 3) -> list[dict[str, str]]:
    with (EVAL / "manifest.csv").open(newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["relpath"])
    picked: list[dict[str, str]] = []
    for gender in ("female", "male"):
        for source in ("pixabay", "fairface"):
            cell = [r for r in rows if r["relpath"].startswith(f"{gender}/{source}/")]
            picked += cell[:: max(1, len(cell) // per_cell)][:per_cell]
    for r in picked:
        (dest / r["relpath"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EVAL / r["relpath"], dest / r["relpath"])
    with (dest / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["relpath", "gender", "age", "group"], extrasaction="ignore")
        w.writeheader()
        w.writerows(picked)
    return picked


@needs_shared
def test_eval_on_real_photos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "photos"
    picked = _subset(data)
    out = tmp_path / "result.json"
    code = cli_main(
        [
            "eval",
            "--data",
            str(data),
            "--model",
            str(MODELS),
            "--weights-dir",
            str(WEIGHTS),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "faces found" in text and "per source" in text
    result = json.loads(out.read_text())
    assert set(result) == KEYS
    assert result["images"] == len(picked) == 12
    assert set(result["per_source"]) == {"pixabay", "fairface"}
    assert set(result["per_class"]) == {"female", "male"}
    assert sum(v["n"] for v in result["per_group"].values()) == 6  # only FairFace rows carry a group
    for table in ("per_source", "per_class", "per_group", "per_age"):
        for row in result[table].values():
            assert set(row) == {"n", "accuracy", "face_found_rate"}
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["face_found_rate"] <= 1
    assert result["face_found_rate"] == 1.0
    assert result["accuracy"] >= 10 / 12  # real photos with known labels
    assert result["images_per_second"] > 0
    meta = load_artifact(current_dir(MODELS) or MODELS).meta
    assert result["model"] == {"name": meta.name, "version": meta.version}


@needs_shared
def test_eval_without_manifest_uses_folder_names(tmp_path: Path) -> None:
    data = tmp_path / "photos"
    _subset(data, per_cell=1)
    (data / "manifest.csv").unlink()
    (data / "female" / "pixabay" / "unreadable.jpg").write_bytes(b"not a photo")
    out = tmp_path / "r.json"
    args = [
        "eval",
        "--data",
        str(data),
        "--model",
        str(MODELS),
        "--weights-dir",
        str(WEIGHTS),
        "--json",
        str(out),
    ]
    assert cli_main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 5 and result["per_group"] == {} and result["per_age"] == {}
    assert result["per_source"]["pixabay"]["face_found_rate"] == pytest.approx(2 / 3)  # the unreadable one


def test_eval_refuses_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "female").mkdir()
    assert cli_main(["eval", "--data", str(tmp_path), "--model", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err
