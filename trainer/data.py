"""Dataset readers: folder-per-class, UTKFace file names and a CSV manifest.

Every reader returns a :class:`Catalog` (the samples plus what was skipped and why); no reader opens the
images themselves (that happens lazily, in :class:`FaceImageDataset` or the crop cache), so a corrupt file
is found, reported and skipped when it is read, never a crash. A catalog with an empty class or a single
class is refused with :class:`DatasetError` and a message that names the problem.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
FORMATS: Final = ("folder", "utkface", "csv")
MANIFEST: Final = "manifest.csv"
#: UTKFace's race codes (file name field 3).
UTK_RACES: Final = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
#: UTKFace's gender codes (file name field 2).
UTK_GENDERS: Final = {0: "male", 1: "female"}
_UTK_RE: Final = re.compile(r"^(?P<age>-?\d+)_(?P<gender>[^_]+)_(?P<race>[^_]+)_")
#: Age bands (FairFace's buckets, so UTKFace's exact ages and FairFace's buckets report alike).
AGE_BANDS: Final = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69))


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message says why and where."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    relpath: str
    group: str | None = None
    age: str | None = None  #: an age band ("20-29", "70+") or None
    source: str | None = None  #: first folder below the class folder, when there is one


@dataclass
class Catalog:
    samples: list[Sample]
    classes: list[str]
    root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (relpath, reason)

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {k: c.get(k, 0) for k in self.classes}

    def validate(self) -> None:
        """Refuse an empty class or a single class, naming it."""
        counts = self.counts()
        empty = [k for k, n in counts.items() if n == 0]
        if empty:
            raise DatasetError(
                f"{self.root}: class {', '.join(repr(e) for e in empty)} has no usable images "
                f"(counts: {counts}); every class needs at least one image"
            )
        if len(self.classes) < 2:
            raise DatasetError(
                f"{self.root}: found a single class {self.classes} ; a classifier needs at least two "
                "(folder format: one sub-folder per class)"
            )

    def without(self, bad: Iterable[int], reason: str) -> Catalog:
        """A copy without the samples at these indices (recorded as skipped with ``reason``)."""
        drop = set(bad)
        kept = [s for i, s in enumerate(self.samples) if i not in drop]
        skipped = self.skipped + [(self.samples[i].relpath, reason) for i in sorted(drop)]
        return Catalog(kept, list(self.classes), self.root, skipped)


def age_band(value: str | int | None) -> str | None:
    """An exact age (``"34"``) -> its band (``"30-39"``); a band already (``"3-9"``) is kept."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if not text.lstrip("-").isdigit():
        return text
    age = int(text)
    if age < 0:
        return None
    for lo, hi in AGE_BANDS:
        if lo <= age <= hi:
            return f"{lo}-{hi}"
    return "70+"


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _walk_images(root: Path, skipped: list[tuple[str, str]], base: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(base)
        if _is_hidden(rel) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
        elif path.name != MANIFEST and path.suffix.lower() != ".csv":
            skipped.append((rel.as_posix(), "not an image file (extension)"))
    return files


def _read_manifest(root: Path) -> dict[str, tuple[str | None, str | None]]:
    """relpath -> (group, age band) from an optional ``manifest.csv`` (columns relpath,...,age,group)."""
    path = root / MANIFEST
    if not path.is_file():
        return {}
    out: dict[str, tuple[str | None, str | None]] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "relpath" not in reader.fieldnames:
            log.warning("%s has no relpath column; ignored", path)
            return {}
        for row in reader:
            group = (row.get("group") or "").strip() or None
            if group == "unknown":
                group = None
            out[row["relpath"]] = (group, age_band(row.get("age")))
    return out


def read_folder(root: Path) -> Catalog:
    """One sub-folder per class (any names); images anywhere below it (nested folders allowed). The first
    folder below the class folder, when there is one, is the image's *source*. An optional
    ``manifest.csv`` (relpath, age, group) adds group and age."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{root}: no class folders (expected one sub-folder per class)")
    extra = _read_manifest(root)
    skipped: list[tuple[str, str]] = []
    samples = []
    for class_dir in class_dirs:
        for path in _walk_images(class_dir, skipped, root):
            rel = path.relative_to(root)
            group, age = extra.get(rel.as_posix(), (None, None))
            source = rel.parts[1] if len(rel.parts) > 2 else None
            samples.append(Sample(path, class_dir.name, rel.as_posix(), group, age, source))
    catalog = Catalog(samples, [d.name for d in class_dirs], root, skipped)
    catalog.validate()
    return catalog


def parse_utkface_name(name: str) -> tuple[int, str, str]:
    """``age_gender_race_date.jpg[.chip.jpg]`` -> (age, gender, race); ValueError on a bad field."""
    m = _UTK_RE.match(name)
    if m is None:
        raise ValueError("name is not age_gender_race_date")
    age = int(m["age"])
    if not 0 <= age <= 120:
        raise ValueError(f"age {age} out of range")
    try:
        gender = UTK_GENDERS[int(m["gender"])]
    except (ValueError, KeyError):
        raise ValueError(f"gender field {m['gender']!r} is not 0 or 1") from None
    try:
        race = UTK_RACES[int(m["race"])]
    except (ValueError, KeyError):
        raise ValueError(f"race field {m['race']!r} is not 0-4") from None
    return age, gender, race


def read_utkface(root: Path) -> Catalog:
    """UTKFace images anywhere below ``root``; labels, age and race come from the file names."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    skipped: list[tuple[str, str]] = []
    samples = []
    for path in _walk_images(root, skipped, root):
        rel = path.relative_to(root).as_posix()
        try:
            age, gender, race = parse_utkface_name(path.name)
        except ValueError as exc:
            skipped.append((rel, f"bad UTKFace name: {exc}"))
            continue
        samples.append(Sample(path, gender, rel, race, age_band(age), None))
    catalog = Catalog(samples, sorted(UTK_GENDERS.values()), root, skipped)
    if not samples:
        raise DatasetError(f"{root}: no images with UTKFace names (age_gender_race_date.jpg)")
    catalog.validate()
    return catalog


def read_csv(path: Path) -> Catalog:
    """A CSV manifest with a header ``path,label[,group][,age]``; paths relative to the CSV's folder.
    ``path`` may also be a folder holding ``manifest.csv`` with those columns."""
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no such CSV file")
    root = path.parent
    skipped: list[tuple[str, str]] = []
    samples = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "path" not in cols or "label" not in cols:
            raise DatasetError(f"{path}: the header must name columns path,label[,group][,age]; got {cols}")
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip()
            if not rel or not label:
                skipped.append((f"{path.name}:{line}", "empty path or label"))
                continue
            file = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((rel, "not an image file (extension)"))
                continue
            if not file.is_file():
                skipped.append((rel, "file not found"))
                continue
            group = (row.get("group") or "").strip() or None
            samples.append(Sample(file, label, rel, group, age_band(row.get("age")), None))
    classes = sorted({s.label for s in samples})
    catalog = Catalog(samples, classes, root, skipped)
    if not samples:
        raise DatasetError(f"{path}: no usable rows")
    catalog.validate()
    return catalog


READERS: Final[dict[str, Callable[[Path], Catalog]]] = {
    "folder": read_folder,
    "utkface": read_utkface,
    "csv": read_csv,
}


def read_dataset(path: Path, fmt: str | None = None) -> Catalog:
    """Read a dataset in ``fmt`` (None: a .csv file -> csv, else folder)."""
    if fmt is None:
        fmt = "csv" if path.suffix.lower() == ".csv" else "folder"
    if fmt not in READERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose from {', '.join(FORMATS)}")
    catalog = READERS[fmt](path)
    for rel, reason in catalog.skipped[:20]:
        log.warning("skipped %s: %s", rel, reason)
    if len(catalog.skipped) > 20:
        log.warning("... and %d more skipped files", len(catalog.skipped) - 20)
    return catalog


def load_bgr(path: Path) -> npt.NDArray[np.uint8] | None:
    """An image as BGR uint8 HxWx3, or None when it cannot be decoded (never raises on bad bytes)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[0] < 8 or image.shape[1] < 8:
        return None
    return np.asarray(image, dtype=np.uint8)


class FaceImageDataset(Dataset[tuple[npt.NDArray[np.uint8] | None, int, int]]):
    """Lazily read images of a catalog: item i is (BGR image or None when unreadable, label index, i).

    An unreadable file yields None (and is remembered in ``unreadable``) instead of raising, so one
    corrupt file never stops a run; callers skip and report it.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.class_index = {c: i for i, c in enumerate(catalog.classes)}
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.catalog.samples)

    def __getitem__(self, index: int) -> tuple[npt.NDArray[np.uint8] | None, int, int]:
        sample = self.catalog.samples[index]
        image = load_bgr(sample.path)
        if image is None:
            self.unreadable.add(index)
        return image, self.class_index[sample.label], index
