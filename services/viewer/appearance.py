"""A cheap appearance signature of each face, so the tracker notices when one face replaces another in
the same place (a cut in a video; one person leaves and another sits down) instead of carrying the
previous person's label over.

The signature is the face box's central area, in grey, shrunk to ``SIDE`` x ``SIDE`` pixels and
normalised to zero mean and unit length: the similarity of two signatures is their normalised
cross-correlation (a dot product, in [-1, 1]). Consecutive frames of one face score high (small moves,
noise and slow zooms hardly change a 12x12 thumbnail), another face in the same box scores far lower
(other features, hair line, skin and background). The frame is decoded at half size in grey, which is
several times cheaper than a full decode; callers run this in a worker thread, off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

#: Side of the thumbnail (pixels); 144 numbers per face.
SIDE = 12
#: Share of the box kept around its centre: the box edges hold background that moves on its own.
INNER = 0.8
#: Faces smaller than this (in half-size pixels) get no signature: too few pixels to tell faces apart.
MIN_SIDE = 6

Signature = npt.NDArray[np.float32]
Box = tuple[float, float, float, float]


def signatures(gray: npt.NDArray[np.uint8], boxes: Sequence[Box], scale: float) -> list[Signature | None]:
    """One signature per box (``None`` where the face is too small or outside the picture); ``boxes``
    are in full-frame pixels, ``gray`` is the frame scaled by ``scale``."""
    height, width = gray.shape[:2]
    out: list[Signature | None] = []
    for x, y, w, h in boxes:
        cx, cy = (x + w / 2) * scale, (y + h / 2) * scale
        hw, hh = w * scale * INNER / 2, h * scale * INNER / 2
        x1, y1 = max(0, int(cx - hw)), max(0, int(cy - hh))
        x2, y2 = min(width, round(cx + hw)), min(height, round(cy + hh))
        if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:
            out.append(None)
            continue
        thumb = cv2.resize(gray[y1:y2, x1:x2], (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        vec = thumb.astype(np.float32).ravel()
        vec -= vec.mean()
        norm = float(np.linalg.norm(vec))
        out.append(vec / norm if norm > 1e-3 else None)
    return out


def signatures_from_jpeg(jpeg: bytes, boxes: Sequence[Box], frame_width: int) -> list[Signature | None]:
    """Decode ``jpeg`` at half size in grey and sign every box. An undecodable frame gives no
    signatures (the tracker then falls back on the class probabilities)."""
    if not boxes:
        return []
    gray = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_2)
    if gray is None or gray.size == 0:
        return [None] * len(boxes)
    scale = gray.shape[1] / frame_width if frame_width > 0 else 0.5
    return signatures(np.asarray(gray, dtype=np.uint8), boxes, scale)


def similarity(a: Signature, b: Signature) -> float:
    return float(np.dot(a, b))
