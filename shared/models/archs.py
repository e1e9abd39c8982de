"""Classifier architectures in a registry keyed by name: ``@register_arch(name)`` / ``build_model``.

Every builder takes ``num_classes`` plus keyword config (saved in the artifact's ``arch_config`` so the
same network is rebuilt at load time) and returns an ``nn.Module`` mapping [N, 3, S, S] normalised
crops to [N, num_classes] logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ArchBuilder = Callable[..., nn.Module]
ARCHITECTURES: dict[str, ArchBuilder] = {}
#: Per architecture, the inclusive (low, high) range of each numeric ``arch_config`` key it bounds,
#: declared with ``register_arch(name, limits=...)``: an artifact's metadata outside them is refused
#: before anything is built (``shared.models.artifact.read_meta``).
ARCH_LIMITS: dict[str, dict[str, tuple[float, float]]] = {}
#: No architecture builds more parameters than this (400 MB as float32), whatever its config:
#: counted on the meta device, before any memory is allocated (``shared.models.artifact``).
MAX_PARAMETERS = 100_000_000


def register_arch(
    name: str, limits: dict[str, tuple[float, float]] | None = None
) -> Callable[[ArchBuilder], ArchBuilder]:
    def deco(builder: ArchBuilder) -> ArchBuilder:
        ARCHITECTURES[name] = builder
        ARCH_LIMITS[name] = dict(limits or {})
        return builder

    return deco


def build_model(name: str, num_classes: int, **config: Any) -> nn.Module:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](num_classes=num_classes, **config)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _DSBlock(nn.Module):
    """Depthwise-separable residual block (MobileNet-style), cheap on CPU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip: nn.Module
        if stride == 1 and cin == cout:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class GenderNet(nn.Module):
    """A small CNN made for aligned 64-96 px face crops: a 3x3 stem, depthwise-separable residual
    stages, global average pooling, dropout, linear head.

    ``flip_tta``: in eval mode, average the logits of each crop and its mirror image (faces are
    left/right symmetric; this steadies predictions at twice the compute). Training is unaffected.
    """

    def __init__(
        self, num_classes: int, width: int = 32, dropout: float = 0.2, flip_tta: bool = False
    ) -> None:
        super().__init__()
        self.flip_tta = flip_tta
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, stride=2),
            _DSBlock(w, w, 1),
            _DSBlock(w, 2 * w, 2),
            _DSBlock(2 * w, 2 * w, 1),
            _DSBlock(2 * w, 4 * w, 2),
            _DSBlock(4 * w, 4 * w, 1),
            _DSBlock(4 * w, 8 * w, 2),
            _DSBlock(8 * w, 8 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_tta and not self.training:
            n = x.shape[0]
            logits = self.head(self.pool(self.features(torch.cat([x, x.flip(3)]))))
            return (logits[:n] + logits[n:]) / 2
        return self.head(self.pool(self.features(x)))


@register_arch("gendernet", limits={"width": (4, 256), "dropout": (0.0, 1.0)})
def gendernet(num_classes: int, width: int = 32, dropout: float = 0.2, flip_tta: bool = False) -> nn.Module:
    return GenderNet(num_classes, width=width, dropout=dropout, flip_tta=flip_tta)


@register_arch("dlib_resnet")
def dlib_resnet(
    num_classes: int,
    hidden: int = 0,
    dropout: float = 0.0,
    trainable_blocks: int = 0,
    flip_tta: bool = False,
) -> nn.Module:
    """dlib's pretrained face-recognition ResNet-29 (150 px chips, ``dlib`` template) + a head; the
    trainer loads the backbone's weights (``trainer.pretrained``), the artifact carries them all."""
    from shared.models.dlib_resnet import DlibGenderNet

    return DlibGenderNet(
        num_classes, hidden=hidden, dropout=dropout, trainable_blocks=trainable_blocks, flip_tta=flip_tta
    )


@register_arch("mobilenet_v3_small")
def mobilenet_v3_small(num_classes: int, dropout: float = 0.2) -> nn.Module:
    from torchvision.models import mobilenet_v3_small as tv

    return tv(weights=None, num_classes=num_classes, dropout=dropout)


@register_arch("resnet18")
def resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18 as tv

    return tv(weights=None, num_classes=num_classes)
