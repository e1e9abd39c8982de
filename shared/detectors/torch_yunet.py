"""YuNet in PyTorch, batched, on CPU or CUDA: the same network and post-processing as ``cv2-yunet``.

The architecture mirrors libfacedetection.train (``YuNetBackbone`` + ``TFPN`` neck + ``YuNet_Head``), so
its checkpoints (``yunet_s.pth``, ``yunet_n.pth``, mmdet key layout) load with ``strict=True``. Decoding
and NMS follow OpenCV's ``FaceDetectorYN`` (modules/objdetect/src/face_detect.cpp) so the two backends
agree face for face:

* input is BGR float 0..255, no mean/std (the checkpoints were trained with mean 0, std 1, no RGB swap);
* the image sits at the top-left of a zero canvas whose sides are multiples of 32;
* per level (stride s, cell col/row): cx = (col + dx) * s, cy = (row + dy) * s, w = exp(dw) * s,
  h = exp(dh) * s; landmark = (kps + (col, row)) * s; score = sqrt(clamp(sigmoid(cls)) * clamp(sigmoid(obj)));
* NMS over candidates with score above the threshold, at most ``top_k`` of the best *before* NMS, on boxes
  truncated to integers, as ``cv2.dnn.NMSBoxes`` does.

Two entry points: the protocol's ``detect(images)`` (numpy BGR frames of any sizes) and
``detect_tensor(frames, sizes)`` for a worker that already holds a uint8 batch on the device and wants
tensors back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from shared.detectors import Detections, DetectorConfig, register, resize_for_detection
from shared.weights import resolve_weights

log = logging.getLogger(__name__)

STRIDES: tuple[int, ...] = (8, 16, 32)
#: OpenCV pads the network input to a multiple of this (the coarsest stride).
DIVISOR = 32
NUM_KPS = 5
#: Head outputs per cell: cls logit, obj logit, bbox (4), landmarks (10).
_HEAD_CHANNELS = 2 + 4 + NUM_KPS * 2

#: Backbone stage channels and shared head convs per checkpoint (libfacedetection.train configs
#: yunet_s / yunet_n; also checked by the strict state_dict load).
VARIANTS: dict[str, tuple[tuple[tuple[int, ...], ...], int]] = {
    "yunet_s": (((3, 16, 16), (16, 32), (32, 64), (64, 64), (64, 64), (64, 64)), 0),
    "yunet_n": (((3, 16, 16), (16, 64), (64, 64), (64, 64), (64, 64), (64, 64)), 1),
}
#: Max-pool (2x2) after these backbone stages; features come out of the last three.
_DOWNSAMPLE_AFTER = (0, 2, 3, 4)
_OUT_STAGES = (3, 4, 5)


# --------------------------------------------------------------------------------------------- network


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return ``conv`` with the eval-mode BatchNorm that follows it folded into its weights."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None, "BatchNorm without running stats cannot be folded"
    gain = bn.weight / torch.sqrt(var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
    )
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * gain.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - mean) * gain + bn.bias)  # type: ignore[union-attr]
    return fused


_ONEDNN = torch.backends.mkldnn.is_available()


def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """1x1 conv. On CPU, single-threaded, PyTorch picks its own GEMM path for 1x1 kernels, which measured
    2x slower here than oneDNN's (it picks oneDNN itself with more threads or a batch >= 16); call
    oneDNN directly for fp32 CPU inputs so speed does not depend on the thread count."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.mkldnn_convolution(x, conv.weight, conv.bias, (0, 0), (1, 1), (1, 1), 1)
    return conv(x)


class ConvDPUnit(nn.Module):
    """1x1 conv, then depthwise 3x3 conv, then (optionally) BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, with_bn_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=True, groups=out_channels)
        self.with_bn_relu = with_bn_relu
        self.bn: nn.Module = nn.BatchNorm2d(out_channels) if with_bn_relu else nn.Identity()

    def fuse(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv2 = _fold_bn(self.conv2, self.bn)
            self.bn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pointwise(x, self.conv1)
        x = self.bn(self.conv2(x))
        # In place: inference only, and it saves a pass over the largest activations.
        return F.relu(x, inplace=True) if self.with_bn_relu else x


class ConvHead(nn.Module):
    """Stem: 3x3 stride-2 conv + BN + ReLU, then a ConvDPUnit (``Conv_head`` upstream)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 2, 1, bias=True)
        self.conv2 = ConvDPUnit(mid_channels, out_channels, True)
        self.bn1: nn.Module = nn.BatchNorm2d(mid_channels)

    def fuse(self) -> None:
        if isinstance(self.bn1, nn.BatchNorm2d):
            self.conv1 = _fold_bn(self.conv1, self.bn1)
            self.bn1 = nn.Identity()
        self.conv2.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True))


class Conv4LayerBlock(nn.Module):
    """Two ConvDPUnits (``Conv4layerBlock`` upstream)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvDPUnit(in_channels, in_channels, True)
        self.conv2 = ConvDPUnit(in_channels, out_channels, True)

    def fuse(self) -> None:
        self.conv1.fuse()
        self.conv2.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class YuNetBackbone(nn.Module):
    def __init__(self, stage_channels: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.stages = len(stage_channels)
        # Attribute names model0..model5 match the checkpoint keys.
        self.model0 = ConvHead(*stage_channels[0])
        for i in range(1, self.stages):
            self.add_module(f"model{i}", Conv4LayerBlock(*stage_channels[i]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(self.stages):
            x = getattr(self, f"model{i}")(x)
            if i in _OUT_STAGES:
                out.append(x)
            if i in _DOWNSAMPLE_AFTER:
                x = F.max_pool2d(x, 2)
        return out


class TFPN(nn.Module):
    """Top-down FPN: each coarser level, after its lateral unit, is upsampled 2x and added to the finer."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvDPUnit(c, c, True) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = list(feats)
        for i in range(len(feats) - 1, 0, -1):
            feats[i] = self.lateral_convs[i](feats[i])
            feats[i - 1] = feats[i - 1] + F.interpolate(feats[i], scale_factor=2.0, mode="nearest")
        feats[0] = self.lateral_convs[0](feats[0])
        return feats


class YuNetHead(nn.Module):
    """Per-level heads (no weight sharing across levels): cls (1), obj (1), bbox (4), kps (10)."""

    def __init__(self, in_channels: int, shared_convs: int, levels: int = len(STRIDES)) -> None:
        super().__init__()
        self.shared_convs = shared_convs
        if shared_convs > 0:
            self.multi_level_share_convs = nn.ModuleList(
                nn.Sequential(*(ConvDPUnit(in_channels, in_channels) for _ in range(shared_convs)))
                for _ in range(levels)
            )
        self.multi_level_cls = nn.ModuleList(ConvDPUnit(in_channels, 1, False) for _ in range(levels))
        self.multi_level_bbox = nn.ModuleList(ConvDPUnit(in_channels, 4, False) for _ in range(levels))
        self.multi_level_obj = nn.ModuleList(ConvDPUnit(in_channels, 1, False) for _ in range(levels))
        self.multi_level_kps = nn.ModuleList(
            ConvDPUnit(in_channels, NUM_KPS * 2, False) for _ in range(levels)
        )

        #: Set by ``merge``: per level one ConvDPUnit computing all 16 outputs at once.
        self.merged: nn.ModuleList | None = None

    def merge(self) -> None:
        """Stack the four output branches of each level into one 1x1 conv + one depthwise conv.

        Exact: the 1x1 convs only stack output channels and the depthwise convs act per channel, so the
        merged unit computes the same 16 channels in the same order, in 2 ops per level instead of 8.
        """
        merged = []
        for i in range(len(self.multi_level_cls)):
            parts: list[ConvDPUnit] = [
                branch[i]  # type: ignore[misc]
                for branch in (
                    self.multi_level_cls,
                    self.multi_level_obj,
                    self.multi_level_bbox,
                    self.multi_level_kps,
                )
            ]
            unit = ConvDPUnit(parts[0].conv1.in_channels, _HEAD_CHANNELS, False)
            with torch.no_grad():
                for name in ("conv1", "conv2"):
                    dst = getattr(unit, name)
                    dst.weight.copy_(torch.cat([getattr(p, name).weight for p in parts]))
                    dst.bias.copy_(torch.cat([getattr(p, name).bias for p in parts]))
            merged.append(unit)
        self.merged = nn.ModuleList(merged)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return per level one [B, 16, H, W] map: cls logit, obj logit, bbox (4), kps (10)."""
        out = []
        for i, feat in enumerate(feats):
            if self.shared_convs > 0:
                feat = self.multi_level_share_convs[i](feat)
            if self.merged is not None:
                out.append(self.merged[i](feat))
                continue
            out.append(
                torch.cat(
                    [
                        self.multi_level_cls[i](feat),
                        self.multi_level_obj[i](feat),
                        self.multi_level_bbox[i](feat),
                        self.multi_level_kps[i](feat),
                    ],
                    dim=1,
                )
            )
        return out


class YuNet(nn.Module):
    """Input: [B, 3, H, W] BGR float 0..255 with H, W multiples of 32. Output: raw per-level head maps."""

    def __init__(self, variant: str = "yunet_s") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown YuNet variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
        stage_channels, shared_convs = VARIANTS[variant]
        out_channels = [stage_channels[i][-1] for i in _OUT_STAGES]
        self.backbone = YuNetBackbone(stage_channels)
        self.neck = TFPN(out_channels)
        self.bbox_head = YuNetHead(out_channels[0], shared_convs)

    def fuse(self) -> YuNet:
        """For inference: fold every BatchNorm into the conv before it and merge the head branches.

        Same outputs up to float rounding; the state_dict layout changes, so load weights first.
        """
        for module in self.modules():
            if isinstance(module, ConvHead | Conv4LayerBlock | ConvDPUnit):
                module.fuse()
        self.bbox_head.merge()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.bbox_head(self.neck(self.backbone(x)))


def load_yunet(path: Path | str, variant: str) -> YuNet:
    """Build ``variant`` and load an mmdet-layout checkpoint into it (strict: a wrong variant fails)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    model = YuNet(variant)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} does not fit YuNet variant {variant!r}: {exc}") from exc
    return model.eval()


# ------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Letterbox:
    """Where a frame sits on the network canvas: canvas = frame * scale + offset (offset in canvas px)."""

    scale: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_frame(self, xy: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Map canvas points [..., 2] back to frame pixels."""
        off = np.array([self.offset_x, self.offset_y], np.float32)
        return ((xy - off) / np.float32(self.scale)).astype(np.float32)

    def to_canvas(self, xy: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        off = np.array([self.offset_x, self.offset_y], np.float32)
        return (xy * np.float32(self.scale) + off).astype(np.float32)


def pad_to_divisor(size: int, divisor: int = DIVISOR) -> int:
    return ((size - 1) // divisor + 1) * divisor


@dataclass(frozen=True)
class TensorDetections:
    """One image's faces as tensors on the model's device, in that image's pixel coordinates.

    boxes: float32 [N, 4] (x, y, w, h); landmarks: float32 [N, 5, 2]; scores: float32 [N].
    """

    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def numpy(self) -> Detections:
        return Detections(
            boxes=np.ascontiguousarray(self.boxes.float().cpu().numpy(), dtype=np.float32),
            landmarks=np.ascontiguousarray(self.landmarks.float().cpu().numpy(), dtype=np.float32),
            scores=np.ascontiguousarray(self.scores.float().cpu().numpy(), dtype=np.float32),
        )


def decode(
    maps: Sequence[torch.Tensor],
    score_threshold: float,
    nms_threshold: float,
    top_k: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decode head maps of a batch into per-image (boxes xywh [N,4], landmarks [N,5,2], scores [N]) in
    canvas pixels, after NMS; rows sorted by descending score. Batched: one NMS call for the batch."""
    batch = maps[0].shape[0]
    device = maps[0].device
    flat: list[torch.Tensor] = []
    for stride, m in zip(STRIDES, maps, strict=True):
        m = m.float()  # decode in fp32 even when the network ran under fp16 autocast
        _, _, rows, cols = m.shape
        ys, xs = torch.meshgrid(
            torch.arange(rows, device=device, dtype=torch.float32),
            torch.arange(cols, device=device, dtype=torch.float32),
            indexing="ij",
        )
        grid = torch.stack([xs, ys], dim=-1).reshape(1, rows * cols, 1, 2)  # (col, row) per cell
        m = m.permute(0, 2, 3, 1).reshape(batch, rows * cols, _HEAD_CHANNELS)
        # OpenCV clamps the sigmoid outputs to [0, 1] before the geometric mean; sigmoid already is.
        score = torch.sqrt(torch.sigmoid(m[..., 0]) * torch.sigmoid(m[..., 1]))
        centre = (m[..., 2:4] + grid[:, :, 0]) * stride
        wh = torch.exp(m[..., 4:6]) * stride
        kps = (m[..., 6:16].reshape(batch, rows * cols, NUM_KPS, 2) + grid) * stride
        flat.append(torch.cat([score[..., None], centre - wh / 2, wh, kps.flatten(2)], dim=-1))
    cand = torch.cat(flat, dim=1)  # [B, N, 15]: score, x, y, w, h, 10 landmark coords

    # Pre-NMS top-k per image, as NMSBoxes does (it keeps the top_k best candidates, then suppresses).
    k = cand.shape[1] if top_k <= 0 else min(top_k, cand.shape[1])
    scores, order = cand[..., 0].topk(k, dim=1, sorted=True)
    cand = cand.gather(1, order[..., None].expand(-1, -1, cand.shape[-1]))
    # NMSBoxes keeps scores strictly above the threshold.
    keep = scores > score_threshold
    image_idx = torch.arange(batch, device=device)[:, None].expand(-1, k)[keep]
    cand = cand[keep]
    # FaceDetectorYN runs NMS on boxes truncated to int (Rect2i); do the same so borderline overlaps
    # resolve the same way.
    xywh = torch.trunc(cand[:, 1:5])
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    kept = batched_nms(xyxy, cand[:, 0], image_idx, nms_threshold)  # sorted by descending score
    cand, image_idx = cand[kept], image_idx[kept]

    out = []
    for b in range(batch):
        rows_b = cand[image_idx == b]
        out.append((rows_b[:, 1:5], rows_b[:, 5:15].reshape(-1, NUM_KPS, 2), rows_b[:, 0]))
    return out


# ------------------------------------------------------------------------------------------- detector


class TorchYuNet:
    """Batched YuNet. ``detect`` takes numpy BGR frames of any sizes; ``detect_tensor`` a uint8 batch."""

    name = "torch-yunet"
    #: Frames per forward pass on CPU (see ``_run``); 1 was fastest for 640x480 on a 2-core EPYC.
    cpu_chunk = 1

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        path = resolve_weights(f"{config.variant}.pth", config.weights_dir, config.weights_cache_dir)
        model = load_yunet(path, config.variant).fuse()
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        log.info("torch-yunet: %s on %s", config.variant, self.device)

    # -- numpy API (the FaceDetector protocol)

    def detect(
        self, images: Sequence[npt.NDArray[np.uint8]], max_side: int | None = None
    ) -> list[Detections]:
        """Detect faces in BGR uint8 frames (HxWx3, sizes may differ) as one batch.

        Each frame is downscaled as the cv2 backend does (long side <= max_side, INTER_AREA) and put at
        the top-left of a shared zero canvas; results are in each frame's own pixels. ``max_side``:
        this long side instead of the config's (the no-face fallback).
        """
        if not images:
            return []
        side = self.config.max_side if max_side is None else max_side
        smalls: list[npt.NDArray[np.uint8]] = []
        boxes: list[Letterbox] = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected HxWx3 BGR images, got shape {image.shape}")
            small, scale = resize_for_detection(image, side)
            smalls.append(small)
            boxes.append(Letterbox(scale))
        canvas_h = pad_to_divisor(max(s.shape[0] for s in smalls))
        canvas_w = pad_to_divisor(max(s.shape[1] for s in smalls))
        canvas = np.zeros((len(smalls), canvas_h, canvas_w, 3), np.uint8)
        for i, small in enumerate(smalls):
            canvas[i, : small.shape[0], : small.shape[1]] = small
        # NHWC uint8 -> NCHW view that is already channels_last in memory: no copy on CPU.
        batch = torch.from_numpy(canvas).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return [d.numpy() for d in self._run(batch, boxes)]

    # -- tensor API (for a batched worker that decodes frames onto the device itself)

    @torch.inference_mode()
    def detect_tensor(
        self,
        frames: torch.Tensor,
        sizes: Sequence[tuple[int, int]] | None = None,
        channel_order: Literal["bgr", "rgb"] = "bgr",
        max_side: int | None = None,
    ) -> list[TensorDetections]:
        """Detect faces in a uint8 batch [B, 3, H, W] (BGR unless ``channel_order="rgb"``).

        ``sizes`` gives each frame's real (height, width) when frames of different sizes were packed at the
        top-left of one tensor (default: all H x W). Each frame is downscaled on the device so its long
        side is <= max_side (antialiased bilinear, close to but not bit-equal with cv2's INTER_AREA) and
        letterboxed onto a common canvas. Returns tensors on the model's device in frame pixels.
        ``max_side``: this long side instead of the config's (the no-face fallback).
        """
        side = self.config.max_side if max_side is None else max_side
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, H, W] batch, got shape {tuple(frames.shape)}")
        batch, _, height, width = frames.shape
        if batch == 0:
            return []
        sizes = list(sizes) if sizes is not None else [(height, width)] * batch
        if len(sizes) != batch:
            raise ValueError(f"{len(sizes)} sizes for {batch} frames")
        frames = frames.to(self.device, non_blocking=True)
        if channel_order == "rgb":
            frames = frames.flip(1)  # the network was trained on BGR
        elif channel_order != "bgr":
            raise ValueError(f"channel_order must be 'bgr' or 'rgb', not {channel_order!r}")

        boxes: list[Letterbox] = []
        scaled: list[tuple[int, int]] = []
        for h, w in sizes:
            if not (0 < h <= height and 0 < w <= width):
                raise ValueError(f"frame size {(h, w)} outside the {height}x{width} batch")
            scale = min(1.0, side / max(h, w))
            boxes.append(Letterbox(scale))
            scaled.append((round(h * scale), round(w * scale)) if scale < 1.0 else (h, w))
        canvas_h = pad_to_divisor(max(h for h, _ in scaled))
        canvas_w = pad_to_divisor(max(w for _, w in scaled))
        if all(b.scale == 1.0 for b in boxes) and all(s == scaled[0] for s in scaled):
            # Common case (same-size frames needing no resize): pad the whole batch at once.
            h0, w0 = scaled[0]
            canvas = F.pad(frames[:, :, :h0, :w0], (0, canvas_w - w0, 0, canvas_h - h0))
        else:
            canvas = frames.new_zeros((batch, 3, canvas_h, canvas_w))
            for i, ((h, w), (sh, sw)) in enumerate(zip(sizes, scaled, strict=True)):
                frame = frames[i : i + 1, :, :h, :w]
                if (sh, sw) != (h, w):
                    resized = F.interpolate(
                        frame.float(), size=(sh, sw), mode="bilinear", antialias=True, align_corners=False
                    )
                    frame = resized.round_().clamp_(0, 255).to(torch.uint8)
                canvas[i, :, :sh, :sw] = frame[0]
        return self._run(canvas, boxes)

    # -- shared core

    @torch.inference_mode()
    def _run(self, canvas: torch.Tensor, boxes: Sequence[Letterbox]) -> list[TensorDetections]:
        """Run the net on a uint8 BGR canvas [B, 3, Hc, Wc] (Hc, Wc multiples of 32); map results back."""
        x = canvas.float().contiguous(memory_format=torch.channels_last)
        autocast: AbstractContextManager[object] = (
            torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        )
        # On CPU a batch's activations outgrow the caches (8 frames of 640x480 need ~40 MB at stride 2)
        # and throughput drops, so the network sees a few frames at a time; decode + NMS stay batched.
        chunk = self.cpu_chunk if self.device.type == "cpu" else x.shape[0]
        with autocast:
            parts = [self.model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
        maps = parts[0] if len(parts) == 1 else [torch.cat(level) for level in zip(*parts, strict=True)]
        decoded = decode(maps, self.config.score_threshold, self.config.nms_threshold, self.config.top_k)
        out = []
        for (xywh, kps, scores), lb in zip(decoded, boxes, strict=True):
            offset = xywh.new_tensor([lb.offset_x, lb.offset_y])
            out.append(
                TensorDetections(
                    boxes=torch.cat([(xywh[:, :2] - offset) / lb.scale, xywh[:, 2:] / lb.scale], dim=1),
                    landmarks=(kps - offset) / lb.scale,
                    scores=scores,
                )
            )
        return out


@register("torch-yunet")
def _factory(config: DetectorConfig) -> TorchYuNet:
    return TorchYuNet(config)


__all__ = [
    "STRIDES",
    "Letterbox",
    "TensorDetections",
    "TorchYuNet",
    "YuNet",
    "decode",
    "load_yunet",
]
