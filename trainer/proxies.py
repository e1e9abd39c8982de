"""Validation proxies for photos the model has never seen: the validation chips made grayscale and made
dark, scored like the plain ones. Choices (architecture, mode, head, augmentation) are made on these and
on the validation breakdowns (class, group, age band), never on the evaluation photos."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Darkening: 30% of the light, a little sensor noise (a dim room the camera did not compensate for).
DARK_GAIN = 0.3
DARK_NOISE = 3.0


def grayscale(crops: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N,3,S,S] -> the same, with every channel the luma (ITU-R BT.601)."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    luma = (crops.float() * w).sum(dim=1, keepdim=True)
    return luma.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def darken(crops: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(crops.shape, generator=gen) * DARK_NOISE
    return (crops.float() * DARK_GAIN + noise).round().clamp(0, 255).to(torch.uint8)


def proxy_accuracies(
    predict: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Accuracy of ``predict`` (uint8 crops -> logits) on the chips, their grayscale and dark copies."""
    out = {}
    for name, view in (("color", crops), ("grayscale", grayscale(crops)), ("dark", darken(crops))):
        out[name] = float((predict(view).argmax(1) == labels).float().mean())
    return out
