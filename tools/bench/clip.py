"""The benchmark's test clip: 640x480 JPEG frames with 1-4 real portraits pasted into each."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "faces" / "eval"
FRAME_SIZE = (640, 480)
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

Image = npt.NDArray[np.uint8]


@dataclass
class Clip:
    jpegs: list[bytes]
    pasted: list[int]  #: portraits pasted per frame (1-4; a photo may show more than one person)


def _layout(n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Cells (x, y, w, h) for n portraits: side by side for 1-3, a 2x2 grid for 4."""
    if n == 4:
        w, h = width // 2, height // 2
        return [(0, 0, w, h), (w, 0, width - w, h), (0, h, w, height - h), (w, h, width - w, height - h)]
    edges = [round(i * width / n) for i in range(n + 1)]
    return [(edges[i], 0, edges[i + 1] - edges[i], height) for i in range(n)]


def _photo_paths(photos_dir: Path) -> list[Path]:
    if not photos_dir.is_dir():
        raise FileNotFoundError(
            f"no face photos at {photos_dir}: pass --photos DIR (a folder of face photos, searched "
            "recursively; the project uses ../shared/data/faces/eval)"
        )
    paths = sorted(p for p in photos_dir.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .jpg/.png photos under {photos_dir}")
    return paths


def _paste(canvas: Image, photo: Image, cell: tuple[int, int, int, int]) -> None:
    """Paste ``photo`` into ``cell`` of ``canvas``, as large as fits, centred, aspect kept."""
    x, y, w, h = cell
    scale = min(w / photo.shape[1], h / photo.shape[0])
    pw, ph = max(1, int(photo.shape[1] * scale)), max(1, int(photo.shape[0] * scale))
    small = cv2.resize(photo, (pw, ph), interpolation=cv2.INTER_AREA)
    ox, oy = x + (w - pw) // 2, y + (h - ph) // 2
    canvas[oy : oy + ph, ox : ox + pw] = small


def build_clip(
    photos_dir: Path, frames: int, seed: int = 0, size: tuple[int, int] = FRAME_SIZE, quality: int = 85
) -> Clip:
    """``frames`` JPEG frames of ``size``, each with 1-4 real portraits pasted (deterministic per seed)."""
    paths = _photo_paths(photos_dir)
    rng = random.Random(seed)
    pool = rng.sample(paths, min(len(paths), 160))
    cache: dict[Path, Image] = {}
    width, height = size
    clip = Clip([], [])
    for _ in range(frames):
        n = rng.randint(1, 4)
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = rng.randrange(40, 200)  # plain background of a random grey
        for cell in _layout(n, width, height):
            path = rng.choice(pool)
            if path not in cache:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    raise FileNotFoundError(f"unreadable photo {path}")
                cache[path] = np.asarray(image, np.uint8)
            _paste(canvas, cache[path], cell)
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        clip.jpegs.append(buf.tobytes())
        clip.pasted.append(n)
    return clip
