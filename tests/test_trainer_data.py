"""Dataset readers, the lazy dataset and the split, on small folders generated with cv2."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.data import (
    DatasetError,
    FaceImageDataset,
    age_band,
    parse_utkface_name,
    read_csv,
    read_dataset,
    read_folder,
    read_utkface,
)
from trainer.split import make_split


def _img(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ok = cv2.imwrite(str(path), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    assert ok
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 this is not really a jpeg")
    return path


def test_folder_nested_corrupt_and_non_images(tmp_path: Path) -> None:
    _img(tmp_path / "woman" / "a.jpg")
    _img(tmp_path / "woman" / "src1" / "deep" / "b.png", 1)
    _corrupt(tmp_path / "woman" / "broken.jpg")
    (tmp_path / "woman" / "notes.txt").write_text("not an image")
    _img(tmp_path / "man" / "src2" / "c.jpg", 2)
    _img(tmp_path / "man" / ".hidden" / "d.jpg", 3)
    (tmp_path / ".git").mkdir()

    cat = read_folder(tmp_path)
    assert cat.classes == ["man", "woman"]
    assert cat.counts() == {"man": 1, "woman": 3}  # broken.jpg is found; reading it is what fails
    assert any(rel.endswith("notes.txt") and "not an image" in why for rel, why in cat.skipped)
    by_rel = {s.relpath: s for s in cat.samples}
    assert by_rel["woman/src1/deep/b.png"].source == "src1"
    assert by_rel["woman/a.jpg"].source is None

    ds = FaceImageDataset(cat)
    items = [ds[i] for i in range(len(ds))]
    bad = [cat.samples[i].relpath for img, _, i in items if img is None]
    assert bad == ["woman/broken.jpg"]
    assert ds.unreadable == {next(i for i, s in enumerate(cat.samples) if s.relpath == "woman/broken.jpg")}
    good = [img for img, _, _ in items if img is not None]
    assert all(img.shape == (40, 40, 3) and img.dtype == np.uint8 for img in good)


def test_folder_manifest_adds_group_and_age(tmp_path: Path) -> None:
    _img(tmp_path / "female" / "x.jpg")
    _img(tmp_path / "male" / "y.jpg", 1)
    (tmp_path / "manifest.csv").write_text("relpath,gender,age,group\nfemale/x.jpg,female,34,Black\n")
    cat = read_folder(tmp_path)
    s = next(s for s in cat.samples if s.relpath == "female/x.jpg")
    assert (s.group, s.age) == ("Black", "30-39")


def test_empty_class_is_a_clear_error(tmp_path: Path) -> None:
    _img(tmp_path / "female" / "a.jpg")
    (tmp_path / "male" / "sub").mkdir(parents=True)
    (tmp_path / "male" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class 'male' has no usable images"):
        read_folder(tmp_path)


def test_single_class_is_a_clear_error(tmp_path: Path) -> None:
    _img(tmp_path / "female" / "a.jpg")
    with pytest.raises(DatasetError, match="single class"):
        read_folder(tmp_path)


def test_missing_folder_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        read_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        read_dataset(tmp_path, "parquet")


def test_utkface_names_with_bad_fields(tmp_path: Path) -> None:
    _img(tmp_path / "25_1_3_20170116174525125.jpg.chip.jpg")
    _img(tmp_path / "nested" / "61_0_0_20170104183514420.jpg", 1)
    _img(tmp_path / "abc_0_0_20170104183514420.jpg", 2)  # age not a number
    _img(tmp_path / "30_2_0_20170104183514420.jpg", 3)  # gender 2
    _img(tmp_path / "30_0_9_20170104183514420.jpg", 4)  # race 9
    _img(tmp_path / "30_0_20170104183514420.jpg", 5)  # a field missing
    _img(tmp_path / "130_0_0_20170104183514420.jpg", 6)  # absurd age
    cat = read_utkface(tmp_path)
    assert sorted(s.relpath for s in cat.samples) == [
        "25_1_3_20170116174525125.jpg.chip.jpg",
        "nested/61_0_0_20170104183514420.jpg",
    ]
    assert len(cat.skipped) == 5 and all("bad UTKFace name" in why for _, why in cat.skipped)
    s = next(s for s in cat.samples if s.relpath.startswith("25_"))
    assert (s.label, s.group, s.age) == ("female", "Indian", "20-29")
    assert parse_utkface_name("3_0_4_2017.jpg") == (3, "male", "Others")


def test_utkface_single_gender_is_refused(tmp_path: Path) -> None:
    _img(tmp_path / "25_1_3_20170116174525125.jpg")
    with pytest.raises(DatasetError, match="'male' has no usable images"):
        read_utkface(tmp_path)


def test_csv_manifest(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "a.jpg")
    _img(tmp_path / "imgs" / "b.jpg", 1)
    _corrupt(tmp_path / "imgs" / "c.jpg")
    (tmp_path / "list.csv").write_text(
        "path,label,group,age\n"
        "imgs/a.jpg,f,g1,7\n"
        "imgs/b.jpg,m,,\n"
        "imgs/c.jpg,m,g2,70\n"
        "imgs/missing.jpg,m,,\n"
        "imgs/doc.pdf,f,,\n"
        ",f,,\n"
    )
    cat = read_dataset(tmp_path / "list.csv")  # format inferred from the suffix
    assert cat.classes == ["f", "m"]
    assert [s.relpath for s in cat.samples] == ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg"]
    assert cat.samples[0].group == "g1" and cat.samples[0].age == "3-9"
    assert cat.samples[2].age == "70+"
    reasons = dict(cat.skipped)
    assert reasons["imgs/missing.jpg"] == "file not found"
    assert "not an image" in reasons["imgs/doc.pdf"]
    assert FaceImageDataset(cat)[2][0] is None  # the corrupt one reads as None, never raises

    (tmp_path / "bad.csv").write_text("file,class\nimgs/a.jpg,f\n")
    with pytest.raises(DatasetError, match="path,label"):
        read_csv(tmp_path / "bad.csv")


def test_age_band() -> None:
    assert age_band("0") == "0-2"
    assert age_band(9) == "3-9"
    assert age_band("69") == "60-69"
    assert age_band("85") == "70+"
    assert age_band("20-29") == "20-29"
    assert age_band("") is None and age_band(None) is None


def test_split_keeps_lookalikes_together_and_stratifies(tmp_path: Path) -> None:
    from trainer.data import Sample

    samples = []
    for i in range(400):
        label = "female" if i % 2 else "male"
        group = ["A", "B", "C", "D"][i % 4]
        samples.append(Sample(tmp_path / f"{i}.jpg", label, f"{label}/{i}.jpg", group, None, None))
    dups = {samples[i].relpath: str(i // 10) for i in range(0, 100)}  # 10 groups of 10 look-alikes
    split = make_split(samples, np.arange(400), dups, 0.2, 0.1, seed=3)
    parts = [set(split.train.tolist()), set(split.val.tolist()), set(split.test.tolist())]
    assert sum(len(p) for p in parts) == 400 and not (parts[0] & parts[1]) and not (parts[1] & parts[2])
    for g in range(10):
        members = {i for i in range(100) if i // 10 == g}
        assert sum(1 for p in parts if p & members) == 1, f"look-alike group {g} was split"
    for label in ("female", "male"):
        n_val = sum(1 for i in split.val.tolist() if samples[i].label == label)
        assert 25 <= n_val <= 55
    again = make_split(samples, np.arange(400), dups, 0.2, 0.1, seed=3)
    assert np.array_equal(again.val, split.val)  # seeded: repeatable
