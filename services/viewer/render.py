"""Server-side drawing: boxes, labels, the heads-up line, face blur and placeholder tiles.

Everything here is synchronous numpy/cv2 work on one frame; the app runs it in a worker thread
(``asyncio.to_thread``) so the event loop keeps serving other clients. Drawing on the server means the
stream looks the same in any browser and in VLC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import numpy.typing as npt

from services.viewer.palette import bgr, colour_of, text_on
from services.viewer.tracker import TrackedFace
from shared.constants import NO_MODEL, UNCERTAIN
from shared.schema import check_jpeg

Image = npt.NDArray[np.uint8]

FONT = cv2.FONT_HERSHEY_SIMPLEX
#: The HUD's note banner ("no inference ..."): Okabe-Ito yellow.
NOTE_BGR = bgr("#F0E442")


@dataclass(frozen=True, slots=True)
class Hud:
    """The heads-up line drawn on every frame."""

    camera_id: str
    fps: float
    latency_ms: float | None
    note: str | None = None  #: e.g. "no inference" or "reconnecting", drawn as a banner


def decode(jpeg: bytes) -> Image:
    """JPEG -> BGR image; ValueError on anything undecodable or over the pixel bound. The frame header
    is checked first (``check_jpeg``), so a decompression bomb is refused without allocating for it."""
    check_jpeg(jpeg)
    image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("undecodable JPEG")
    return np.asarray(image, dtype=np.uint8)


def encode(image: Image, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


def _clip_box(box: Sequence[float], width: int, height: int, grow: float = 0.0) -> tuple[int, int, int, int]:
    x, y, w, h = box
    x, y, w, h = x - w * grow / 2, y - h * grow / 2, w * (1 + grow), h * (1 + grow)
    x1, y1 = max(0, int(x)), max(0, int(y))
    x2, y2 = min(width, round(x + w)), min(height, round(y + h))
    return x1, y1, x2, y2


def blur_region(image: Image, x1: int, y1: int, x2: int, y2: int) -> None:
    """Irreversibly smear a region in place: downscale hard, blur, upscale. Pixelation alone keeps
    sharp block edges (and can be partly undone); this leaves only a smooth colour wash."""
    if x2 - x1 < 2 or y2 - y1 < 2:
        return
    roi = image[y1:y2, x1:x2]
    small = cv2.resize(roi, (max(2, (x2 - x1) // 12), max(2, (y2 - y1) // 12)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 1.5)
    image[y1:y2, x1:x2] = cv2.resize(small, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)


def blur_faces(image: Image, faces: Sequence[TrackedFace]) -> None:
    height, width = image.shape[:2]
    for face in faces:
        # Grow the box a little: detector boxes are tight and hair/ears identify people too.
        blur_region(image, *_clip_box(face.box, width, height, grow=0.25))


def _text_box(
    image: Image,
    text: str,
    org: tuple[int, int],
    scale: float,
    fg: tuple[int, int, int],
    bg: tuple[int, int, int],
    thickness: int,
) -> tuple[int, int]:
    """Text on a filled background so it stays legible on any scene; returns its (w, h)."""
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thickness)
    pad = max(2, int(th * 0.35))
    x, y = org
    height, width = image.shape[:2]
    x = min(max(0, x), max(0, width - tw - 2 * pad))
    y = min(max(th + 2 * pad, y), height)
    cv2.rectangle(image, (x, y - th - 2 * pad), (x + tw + 2 * pad, y + base // 2), bg, cv2.FILLED)
    cv2.putText(image, text, (x + pad, y - pad), FONT, scale, fg, thickness, cv2.LINE_AA)
    return tw + 2 * pad, th + 2 * pad


def _dashed_rect(
    image: Image, p1: tuple[int, int], p2: tuple[int, int], colour: tuple[int, int, int], t: int
) -> None:
    x1, y1 = p1
    x2, y2 = p2
    dash = max(6, (x2 - x1) // 8)
    for x in range(x1, x2, dash * 2):
        cv2.line(image, (x, y1), (min(x + dash, x2), y1), colour, t, cv2.LINE_AA)
        cv2.line(image, (x, y2), (min(x + dash, x2), y2), colour, t, cv2.LINE_AA)
    for y in range(y1, y2, dash * 2):
        cv2.line(image, (x1, y), (x1, min(y + dash, y2)), colour, t, cv2.LINE_AA)
        cv2.line(image, (x2, y), (x2, min(y + dash, y2)), colour, t, cv2.LINE_AA)


def face_caption(face: TrackedFace) -> str:
    if face.label == NO_MODEL:
        return NO_MODEL
    if face.label == UNCERTAIN:
        return f"{UNCERTAIN} #{face.track_id}"
    return f"{face.label} {face.confidence * 100:.0f}% #{face.track_id}"


def draw_faces(
    image: Image, faces: Sequence[TrackedFace], classes: Sequence[str] = (), reserved_top: int = 0
) -> None:
    """Boxes and captions, coloured by the label's place in ``classes`` (the model's class names in
    its order, see ``palette.py``). A caption goes above its box, or just inside the box's top edge
    where above would run into the top ``reserved_top`` pixels (the HUD) or off the frame."""
    height, width = image.shape[:2]
    unit = max(width, height) / 1000  # scale strokes and text with the frame, legible when shrunk
    thickness = max(2, round(2.5 * unit))
    for face in faces:
        x1, y1, x2, y2 = _clip_box(face.box, width, height)
        hex_colour = colour_of(face.label, classes)
        colour = bgr(hex_colour)
        # A dark outline under every stroke keeps boxes visible on light and dark scenes alike.
        if face.label in (UNCERTAIN, NO_MODEL):
            # A dashed box says "not a verdict" without relying on colour alone.
            _dashed_rect(image, (x1, y1), (x2, y2), (20, 20, 20), thickness + 2)
            _dashed_rect(image, (x1, y1), (x2, y2), colour, thickness)
        else:
            cv2.rectangle(image, (x1, y1), (x2, y2), (20, 20, 20), thickness + 2, cv2.LINE_AA)
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
        scale = max(0.6, 0.9 * unit)  # legible on a wall tile a third of the frame's size
        text_thick = max(1, thickness - 1)
        caption = face_caption(face)
        (_, th), base = cv2.getTextSize(caption, FONT, scale, text_thick)
        label_h = th + 2 * max(2, int(th * 0.35)) + base // 2
        y = y1 - 2 if y1 - 2 - label_h >= reserved_top else y1 + label_h
        _text_box(image, caption, (x1, y), scale, text_on(hex_colour), colour, text_thick)


def _hud_lines(hud: Hud) -> list[str]:
    latency = f"{hud.latency_ms:.0f} ms" if hud.latency_ms is not None else "-"
    lines = [f"{hud.camera_id}  {hud.fps:4.1f} fps  latency {latency}"]
    if hud.note:
        lines.append(hud.note)
    return lines


def _hud_corner(
    width: int, height: int, size: tuple[int, int], faces: Sequence[TrackedFace], label_h: int
) -> tuple[int, int]:
    """Top-left corner of the HUD block: the first corner (top-left, top-right, bottom-left,
    bottom-right) clear of every face and its caption, else the one overlapping them least."""
    w, h = size
    regions = [
        (face.box[0], face.box[1] - label_h, face.box[0] + face.box[2], face.box[1] + face.box[3])
        for face in faces
    ]
    best, best_overlap = (0, 0), float("inf")
    for x, y in ((0, 0), (width - w, 0), (0, height - h), (width - w, height - h)):
        overlap = sum(
            max(0.0, min(x + w, x2) - max(x, x1)) * max(0.0, min(y + h, y2) - max(y, y1))
            for x1, y1, x2, y2 in regions
        )
        if overlap < best_overlap:
            best, best_overlap = (max(0, x), max(0, y)), overlap
        if overlap == 0:
            break
    return best


def draw_hud(image: Image, hud: Hud, faces: Sequence[TrackedFace] = ()) -> None:
    """The HUD block (camera, fps, latency; a note such as "no inference" on a second line) in a
    corner clear of the faces, so it never hides a face's label."""
    height, width = image.shape[:2]
    unit = max(width, height) / 1000
    scale = max(0.55, 0.7 * unit)
    thick = max(1, round(1.5 * unit))
    lines = _hud_lines(hud)
    sizes = [cv2.getTextSize(line, FONT, scale, thick) for line in lines]
    pad = max(2, int(sizes[0][0][1] * 0.35))
    line_h = [th + 2 * pad + base // 2 for (_, th), base in sizes]
    block = (max(tw for (tw, _), _ in sizes) + 2 * pad, sum(line_h))
    caption_h = cv2.getTextSize("Ay", FONT, max(0.6, 0.9 * unit), max(1, max(2, round(2.5 * unit)) - 1))
    x, y = _hud_corner(width, height, block, faces, caption_h[0][1] + caption_h[1] + 2 * pad)
    for i, line in enumerate(lines):
        y += line_h[i]
        fg, bg = ((255, 255, 255), (32, 32, 32)) if i == 0 else ((0, 0, 0), NOTE_BGR)
        _text_box(image, line, (x, y - (line_h[i] - sizes[i][0][1] - 2 * pad)), scale, fg, bg, thick)


def annotate(
    jpeg: bytes,
    faces: Sequence[TrackedFace],
    hud: Hud,
    *,
    blur: bool,
    blur_all: bool,
    quality: int,
    classes: Sequence[str] = (),
) -> bytes:
    """Decode a frame, blur (if asked), draw faces and the HUD, encode. ``blur_all`` smears the whole
    picture: used when blur is on but no detections are known for this frame, so privacy never
    depends on inference being up. ``classes``: the model's class names, for the colours."""
    image = decode(jpeg)
    if blur_all:
        height, width = image.shape[:2]
        blur_region(image, 0, 0, width, height)
    elif blur:
        blur_faces(image, faces)
    # The HUD first, in a corner clear of the faces, and the faces over it: a label is never hidden.
    draw_hud(image, hud, faces)
    draw_faces(image, faces, classes)
    return encode(image, quality)


@lru_cache(maxsize=64)
def placeholder(title: str, subtitle: str, width: int = 640, height: int = 360, quality: int = 80) -> bytes:
    """A dark tile with a message ("no signal", "reconnecting"), instead of a frozen last frame."""
    image = np.full((height, width, 3), 24, dtype=np.uint8)
    # Diagonal stripes make "no picture" obvious at a glance even on a small tile.
    for x in range(-height, width, 28):
        cv2.line(image, (x, height), (x + height, 0), (34, 34, 34), 8)
    (tw, th), _ = cv2.getTextSize(title, FONT, 1.4, 3)
    cv2.putText(image, title, ((width - tw) // 2, height // 2), FONT, 1.4, (235, 235, 235), 3, cv2.LINE_AA)
    (sw, _), _ = cv2.getTextSize(subtitle, FONT, 0.7, 2)
    cv2.putText(
        image,
        subtitle,
        ((width - sw) // 2, height // 2 + th + 14),
        FONT,
        0.7,
        (170, 170, 170),
        2,
        cv2.LINE_AA,
    )
    return encode(image, quality)
