"""dlib's face-recognition ResNet-29 (``dlib_face_recognition_resnet_model_v1``) in PyTorch.

The network maps a 150 x 150 RGB face chip to a 128-d embedding trained (by Davis King, on about 3M
faces, metric loss) so that photos of one person lie close together. Its features separate perceived
gender, age and more far better than anything a small net learns from 20k chips, so it is the backbone of
the ``dlib_resnet`` classifier: embedding -> linear head.

The layout follows dlib's definition (``dnn_face_recognition_ex.cpp``) exactly, including two quirks
that a generic ResNet does not have, both needed for equal outputs:

* strided convolutions have no padding (dlib's default for stride 2), so the two branches of a
  downsampling block can differ in size (8 x 8 -> 3 x 3 conv vs 4 x 4 average pool); dlib's
  ``add_prev`` adds them over the larger size with zeros where one branch has no value;
* the shortcut of a downsampling block is a 2 x 2 average pool, zero-padded in channels.

dlib's batch-norm layers are already ``affine`` (scale and shift) in the released file; they are kept as
separate per-channel scale/shift tensors so the file maps 1:1 onto this module (and stay trainable when
the last blocks are fine-tuned). ``trainer.pretrained`` converts dlib's own file into this state dict.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

#: dlib's ``input_rgb_image_sized<150>``: (pixel - mean) / 256, RGB order.
DLIB_MEAN_RGB: Final = (122.782, 117.001, 104.298)
DLIB_SCALE: Final = 256.0
EMBEDDING_DIM: Final = 128
CHIP_SIZE: Final = 150
#: (output channels, downsample) per residual block, in forward order: dlib's alevel4..alevel0.
BLOCKS: Final = (
    (32, False),
    (32, False),
    (32, False),
    (64, True),
    (64, False),
    (64, False),
    (64, False),
    (128, True),
    (128, False),
    (128, False),
    (256, True),
    (256, False),
    (256, False),
    (256, True),
)


class Affine(nn.Module):
    """Per-channel scale and shift (dlib's ``affine`` layer: batch norm frozen into two vectors)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger of each dimension, missing values taken as 0."""
    if a.shape == b.shape:
        return a + b
    c = max(a.shape[1], b.shape[1])
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """conv3x3(stride) -> affine -> relu -> conv3x3 -> affine, plus the shortcut, then relu."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, pad = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, pad)
        self.aff1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.aff2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_padded(y, skip))


class DlibResNet(nn.Module):
    """150 x 150 RGB chip, normalised as dlib does ((x - mean) / 256) -> 128-d embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 0)
        self.aff1 = Affine(32)
        blocks = []
        cin = 32
        for cout, down in BLOCKS:
            blocks.append(ResBlock(cin, cout, down))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(256, EMBEDDING_DIM, bias=False)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.aff1(self.conv1(x))), 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


class DlibGenderNet(nn.Module):
    """dlib's ResNet-29 embedding -> L2 normalisation -> head (linear, or one hidden layer).

    ``trainable_blocks``: how many of the backbone's last residual blocks train with the head (0 = the
    backbone is frozen: only the head learns; the earlier layers never train either way, so they run
    without autograd). ``flip_tta``: in eval mode, average each chip's logits with its mirror image's.
    The embedding is L2-normalised because dlib trained it for cosine/euclidean comparisons: its norm
    carries little beyond image quality.
    """

    def __init__(
        self,
        num_classes: int,
        hidden: int = 0,
        dropout: float = 0.0,
        trainable_blocks: int = 0,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= trainable_blocks <= len(BLOCKS):
            raise ValueError(f"trainable_blocks must be 0..{len(BLOCKS)}")
        self.backbone = DlibResNet()
        self.trainable_blocks = trainable_blocks
        self.flip_tta = flip_tta
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden:
            layers += [
                nn.Linear(EMBEDDING_DIM, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            ]
        else:
            layers.append(nn.Linear(EMBEDDING_DIM, num_classes))
        self.head = nn.Sequential(*layers)
        self.freeze_backbone()

    def freeze_backbone(self) -> None:
        """requires_grad only for the head and the last ``trainable_blocks`` blocks (+ the final fc)."""
        first = len(BLOCKS) - self.trainable_blocks
        for name, p in self.backbone.named_parameters():
            trainable = self.trainable_blocks > 0 and (
                name.startswith("fc.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= first)
            )
            p.requires_grad_(trainable)

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The activations entering the first trainable block (no autograd)."""
        with torch.no_grad():
            x = self.backbone.stem(x)
            for block in self.backbone.blocks[: len(BLOCKS) - self.trainable_blocks]:
                x = block(x)
        return x

    def trainable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """From :meth:`frozen_features` to logits (the part that learns)."""
        if self.trainable_blocks == 0:
            emb = self.backbone.fc(x.mean(dim=(2, 3)))
        else:
            for block in self.backbone.blocks[len(BLOCKS) - self.trainable_blocks :]:
                x = block(x)
            emb = self.backbone.fc(x.mean(dim=(2, 3)))
        return self.head(F.normalize(emb, dim=1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised 128-d embedding (the head's input)."""
        return F.normalize(self.backbone(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_tta and not self.training:
            n = x.shape[0]
            logits = self.trainable_forward(self.frozen_features(torch.cat([x, x.flip(3)])))
            return (logits[:n] + logits[n:]) / 2
        return self.trainable_forward(self.frozen_features(x))
