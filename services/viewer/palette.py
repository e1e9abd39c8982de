"""Colours of the labels, for the drawn boxes and the page alike, from the model's own class list.

The Okabe-Ito palette (distinguishable with the common colour-vision deficiencies): each class gets
the colour of its index in the model's class order (the shipped model's ``female``, ``male`` get
orange and sky blue), ``uncertain`` grey and ``no model`` reddish purple. A model with more than
six classes repeats colours: the label text is always drawn, so colour is never the only cue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from shared.constants import NO_MODEL

#: Okabe-Ito without black (unseen on the dark box outline) and reddish purple (kept for "no model"),
#: in the palette's own order.
CLASS_COLOURS: Final = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00")
UNCERTAIN_COLOUR: Final = "#BBBBBB"  # grey
NO_MODEL_COLOUR: Final = "#CC79A7"  # reddish purple


def colour_of(label: str, classes: Sequence[str]) -> str:
    """``#RRGGBB`` of a label: by its index in ``classes`` (the model's order); grey for uncertain
    and for a name the model does not have, reddish purple for no model."""
    if label == NO_MODEL:
        return NO_MODEL_COLOUR
    if label in classes:
        return CLASS_COLOURS[list(classes).index(label) % len(CLASS_COLOURS)]
    return UNCERTAIN_COLOUR


def bgr(colour: str) -> tuple[int, int, int]:
    """``#RRGGBB`` as OpenCV's (blue, green, red)."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return b, g, r


def text_on(colour: str) -> tuple[int, int, int]:
    """Black or white text (BGR), whichever reads better on ``colour`` (WCAG relative luminance)."""

    def channel(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    b, g, r = bgr(colour)
    luminance = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def class_colours(classes: Sequence[str]) -> list[dict[str, str]]:
    """``[{"name", "colour"}]`` in the model's order: what the page needs to show the classes."""
    return [{"name": name, "colour": colour_of(name, classes)} for name in classes]
