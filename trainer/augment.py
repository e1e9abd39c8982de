"""Batched augmentations for aligned face crops, made to look like webcam frames and other cameras.

Applied to a uint8 [B, 3, S, S] batch on the training device: JPEG re-encoding at a random quality (on
CPU, per image), then in float: small rotation / scale / shift (the landmark jitter of a different
detector or frame), horizontal flip, lighting (brightness, contrast, gamma, white balance, saturation),
grayscale, blur or low resolution, sensor noise and a random occluding patch. Returns float 0..1.
Everything draws from the given generator, so a seeded run is repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (25, 95)
    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.9, 1.12)
    shift: float = 0.05
    flip_p: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.35
    gamma: float = 0.35
    white_balance: float = 0.12
    saturation: float = 0.45
    gray_p: float = 0.15
    blur_p: float = 0.25
    lowres_p: float = 0.25
    noise_p: float = 0.3
    noise_std: float = 0.04
    erase_p: float = 0.25
    #: Unsharp masking: photos from good cameras are sharper than the training chips.
    sharpen_p: float = 0.3
    sharpen_amount: tuple[float, float] = (0.5, 2.0)
    #: Black out the crop beyond a random straight edge: what a face at the border of a frame gives.
    edge_p: float = 0.2
    edge_max: float = 0.35


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen).to(device) * (hi - lo) + lo


def _bern(gen: torch.Generator, n: int, p: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < p).to(device)


def jpeg_batch(crops: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Re-encode a random subset of uint8 CPU crops as JPEG at random qualities."""
    n = crops.shape[0]
    pick = torch.rand(n, generator=gen) < cfg.jpeg_p
    quality = torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (n,), generator=gen)
    if not pick.any():
        return crops
    out = crops.clone()
    for i in pick.nonzero(as_tuple=True)[0].tolist():
        img = np.ascontiguousarray(crops[i].permute(1, 2, 0).numpy())
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality[i])])
        if ok:
            dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # channel order is irrelevant: encoded as-is
            out[i] = torch.from_numpy(dec).permute(2, 0, 1)
    return out


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-(x.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).clamp_min(1e-3) ** 2))
    return k / k.sum(dim=1, keepdim=True)  # [B, K]


def augment(
    crops: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, device: torch.device
) -> torch.Tensor:
    """uint8 CPU [B,3,S,S] -> augmented float [B,3,S,S] in 0..1 on ``device``. The steps draw from
    ``gen`` in this order, so a seed gives the same batch."""
    crops = jpeg_batch(crops, gen, cfg)
    x = crops.to(device, non_blocking=True).float() / 255.0
    for step in (_geometry, _lighting, _blur, _sharpen, _low_resolution, _noise, _occlusion, _frame_edge):
        x = step(x, gen, cfg)
    return x


def _geometry(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Rotation, scale, shift and flip in one affine grid (zeros outside, as at a frame edge)."""
    (b, _, s, _), device = x.shape, x.device
    ang = _uniform(gen, b, -cfg.rotate_deg, cfg.rotate_deg, device) * (math.pi / 180)
    scl = _uniform(gen, b, cfg.scale[0], cfg.scale[1], device)
    tx = _uniform(gen, b, -cfg.shift, cfg.shift, device) * 2
    ty = _uniform(gen, b, -cfg.shift, cfg.shift, device) * 2
    flip = torch.where(_bern(gen, b, cfg.flip_p, device), -1.0, 1.0)
    cos, sin = torch.cos(ang) / scl, torch.sin(ang) / scl
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], dim=1), torch.stack([sin * flip, cos, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, [b, 3, s, s], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _lighting(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, white balance, gamma, saturation (or grayscale)."""
    b, device = x.shape[0], x.device
    bright = _uniform(gen, b, 1 - cfg.brightness, 1 + cfg.brightness, device).view(b, 1, 1, 1)
    x = x * bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(gen, b, 1 - cfg.contrast, 1 + cfg.contrast, device).view(b, 1, 1, 1)
    x = (x - mean) * contrast + mean
    wb = _uniform(gen, b * 3, 1 - cfg.white_balance, 1 + cfg.white_balance, device).view(b, 3, 1, 1)
    x = (x * wb).clamp(0, 1)
    gamma = torch.exp(_uniform(gen, b, -cfg.gamma, cfg.gamma, device)).view(b, 1, 1, 1)
    x = x.clamp_min(1e-6) ** gamma
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    sat = _uniform(gen, b, 1 - cfg.saturation, 1 + cfg.saturation, device).view(b, 1, 1, 1)
    sat = torch.where(_bern(gen, b, cfg.gray_p, device).view(b, 1, 1, 1), torch.zeros_like(sat), sat)
    return (gray + (x - gray) * sat).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable gaussian blur, one sigma per image (radius 3, edges replicated)."""
    b, _, s, _ = x.shape
    k = _gaussian_kernels(sigma, 3)  # [B, 7]
    kh = k.repeat_interleave(3, dim=0).view(b * 3, 1, 1, -1)
    xb = F.conv2d(F.pad(x.reshape(1, b * 3, s, s), (3, 3, 0, 0), mode="replicate"), kh, groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 3, 3), mode="replicate"), kh.transpose(2, 3), groups=b * 3)
    return xb.view(b, 3, s, s)


def _blur(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    b, device = x.shape[0], x.device
    blur = _bern(gen, b, cfg.blur_p, device)
    if not blur.any():
        return x
    sigma = _uniform(gen, b, 0.4, 1.4, device)
    return torch.where(blur.view(b, 1, 1, 1), _gaussian_blur(x, sigma), x)


def _sharpen(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Unsharp masking: photos from good cameras are sharper than the training chips."""
    b, device = x.shape[0], x.device
    sharpen = _bern(gen, b, cfg.sharpen_p, device)
    if not sharpen.any():
        return x
    soft = _gaussian_blur(x, torch.full((b,), 1.0, device=device))
    amount = _uniform(gen, b, *cfg.sharpen_amount, device).view(b, 1, 1, 1)
    sharp = (x + amount * (x - soft)).clamp(0, 1)
    return torch.where(sharpen.view(b, 1, 1, 1), sharp, x)


def _low_resolution(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Down to a random side, then back up (a small or distant face)."""
    b, _, s, _ = x.shape
    lowres = _bern(gen, b, cfg.lowres_p, x.device)
    if not lowres.any():
        return x
    side = int(torch.randint(s // 3, s - s // 8, (1,), generator=gen))
    small = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    up = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return torch.where(lowres.view(b, 1, 1, 1), up, x)


def _noise(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Sensor noise."""
    b, device = x.shape[0], x.device
    noisy = _bern(gen, b, cfg.noise_p, device).view(b, 1, 1, 1)
    std = _uniform(gen, b, 0.0, cfg.noise_std, device).view(b, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen).to(device) * std
    return torch.where(noisy, x + noise, x).clamp(0, 1)


def _occlusion(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One grey-ish rectangle (hand, phone, microphone) on some images."""
    (b, _, s, _), device = x.shape, x.device
    erase = _bern(gen, b, cfg.erase_p, device)
    if not erase.any():
        return x
    eh = (_uniform(gen, b, 0.15, 0.4, device) * s).long()
    ew = (_uniform(gen, b, 0.15, 0.5, device) * s).long()
    ey = (torch.rand(b, generator=gen).to(device) * (s - eh)).long()
    ex = (torch.rand(b, generator=gen).to(device) * (s - ew)).long()
    fill = torch.rand(b, 3, generator=gen).to(device).view(b, 3, 1, 1)
    yy = torch.arange(s, device=device).view(1, s, 1)
    xx = torch.arange(s, device=device).view(1, 1, s)
    mask = (
        (yy >= ey.view(b, 1, 1))
        & (yy < (ey + eh).view(b, 1, 1))
        & (xx >= ex.view(b, 1, 1))
        & (xx < (ex + ew).view(b, 1, 1))
        & erase.view(b, 1, 1)
    ).unsqueeze(1)
    return torch.where(mask, fill.expand_as(x), x)


def _frame_edge(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Zero beyond a random line that cuts off at most ``edge_max`` of the crop from one side."""
    (b, _, s, _), device = x.shape, x.device
    edge = _bern(gen, b, cfg.edge_p, device)
    if not edge.any():
        return x
    phi = _uniform(gen, b, 0, 2 * math.pi, device)
    depth = _uniform(gen, b, 1 - 2 * cfg.edge_max, 1.0, device)  # in normalised units, -1..1
    coords = torch.linspace(-1, 1, s, device=device)
    proj = torch.cos(phi).view(b, 1, 1) * coords.view(1, 1, s) + torch.sin(phi).view(b, 1, 1) * coords.view(
        1, s, 1
    )
    outside = (proj > depth.view(b, 1, 1)) & edge.view(b, 1, 1)
    return x.masked_fill(outside.unsqueeze(1), 0.0)
