"""The one face preprocessing function, shared by training and serving (no train/serve skew).

detect (any registered detector) -> five landmarks -> similarity transform onto a fixed template ->
bilinear warp to an ``size`` x ``size`` RGB uint8 crop -> normalise with the artifact's mean/std.

The warp is done in PyTorch (``affine_grid`` + ``grid_sample``) so that the same code runs batched on
CPU or CUDA: the trainer calls :func:`align_faces` on CPU to build its cache, the inference worker calls
it on whatever device it runs. ``PREPROCESS_VERSION`` is written into every model artifact; a worker
refuses an artifact made with a different version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

PREPROCESS_VERSION: Final = 1

#: Target positions of YuNet's five landmarks (right eye, left eye, nose, right/left mouth corner) as
#: fractions of the crop side: the median framing of the UTKFace "aligned & cropped" chips the default
#: model is trained on (measured with YuNet on 932 chips, mirrored to be left/right symmetric). Serving
#: crops therefore frame a face exactly as the training chips do (forehead, hairline, chin), so the
#: classifier never sees a framing it was not trained on.
TEMPLATE: Final = np.array(
    [
        [0.3052, 0.2915],
        [0.6948, 0.2915],
        [0.5000, 0.5010],
        [0.3358, 0.6827],
        [0.6642, 0.6827],
    ],
    dtype=np.float32,
)
#: dlib's face chip (``dlib.get_face_chip(img, shape, size=150, padding=0.25)``, the input of its
#: face-recognition ResNet), expressed for YuNet's five landmarks: measured by detecting with YuNet on
#: 865 dlib chips of UTKFace training images (dlib's HOG detector + its 5-point shape predictor, chips
#: at padding 1.0, converted to 0.25), median per point, mirrored to be left/right symmetric. The
#: interquartile spread was 3-4.5 px at 150 px: the pretrained network sees the framing it was trained on.
DLIB_TEMPLATE: Final = np.array(
    [
        [0.3104, 0.3037],
        [0.6896, 0.3037],
        [0.5000, 0.5041],
        [0.3413, 0.6619],
        [0.6587, 0.6619],
    ],
    dtype=np.float32,
)
#: Alignment templates by name: an artifact's ``template`` field names the one its crops use, so the
#: framing is part of the model's contract (training and serving read it from the same place).
TEMPLATES: Final = {"utkface": TEMPLATE, "dlib": DLIB_TEMPLATE}
DEFAULT_TEMPLATE: Final = "utkface"
#: The crop shows the template area enlarged by this factor around the crop centre (1.0 = the chips'
#: own framing; larger shows more context but pads training chips with black).
DEFAULT_MARGIN: Final = 1.0


def template(size: int, margin: float = DEFAULT_MARGIN, name: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """The five target points of template ``name`` in a ``size`` x ``size`` crop."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown alignment template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    unit = (torch.from_numpy(TEMPLATES[name]) - 0.5) / margin + 0.5
    return unit * size


def similarity_matrices(landmarks: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms (rotation, uniform scale, translation; no reflection)
    mapping each set of ``landmarks`` [N, 5, 2] onto ``dst`` [5, 2]. Returns [N, 2, 3] (image -> crop)."""
    src = landmarks.to(torch.float64)
    dst64 = dst.to(device=src.device, dtype=torch.float64)
    mu_s = src.mean(dim=1, keepdim=True)
    mu_d = dst64.mean(dim=0, keepdim=True)
    s = src - mu_s
    d = (dst64 - mu_d).expand_as(s)
    denom = (s**2).sum(dim=(1, 2)).clamp_min(1e-9)
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(dim=1) / denom
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / denom
    rot = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=-2)  # [N,2,2]
    trans = mu_d.squeeze(0) - (rot @ mu_s.transpose(1, 2)).squeeze(-1)  # [N,2]
    return torch.cat([rot, trans.unsqueeze(-1)], dim=-1).to(torch.float32)


def _sampling_thetas(matrices: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Turn image->crop pixel transforms into grid_sample thetas (normalised crop -> normalised image),
    with pixel centres at integer coordinates (cv2.warpAffine's convention, align_corners=False)."""
    n = matrices.shape[0]
    dev, dt = matrices.device, torch.float64
    full = torch.zeros((n, 3, 3), device=dev, dtype=dt)
    full[:, :2, :] = matrices.to(dt)
    full[:, 2, 2] = 1.0
    inv = torch.linalg.inv(full)  # crop pixel -> image pixel
    out_to_px = torch.tensor(
        [[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]], device=dev, dtype=dt
    )
    px_to_in = torch.tensor(
        [[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]], device=dev, dtype=dt
    )
    theta = px_to_in @ inv @ out_to_px
    return theta[:, :2, :].to(torch.float32)


def align_faces(
    frames: torch.Tensor,
    frame_index: torch.Tensor,
    landmarks: torch.Tensor,
    size: int,
    margin: float = DEFAULT_MARGIN,
    template_name: str = DEFAULT_TEMPLATE,
) -> torch.Tensor:
    """Aligned face crops from a batch of frames.

    frames: uint8 [B, 3, H, W] RGB (frames of other sizes padded at the bottom/right: coordinates
    stay those of the original frame); frame_index: int64 [N], the frame each face is in; landmarks:
    [N, 5, 2] in frame pixels; ``template_name``: the alignment template (the artifact's). Returns uint8 [N, 3, size, size] RGB on the frames' device. Pixels
    outside the frame are black. One ``grid_sample`` per frame that has faces (the faces of a frame
    are sampled together as one tall grid), never one call per face.
    """
    n = int(landmarks.shape[0])
    device = frames.device
    out = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=device)
    if n == 0:
        return out
    height, width = int(frames.shape[2]), int(frames.shape[3])
    matrices = similarity_matrices(landmarks.to(device), template(size, margin, template_name).to(device))
    thetas = _sampling_thetas(matrices, height, width, size)
    grids = F.affine_grid(thetas, [n, 3, size, size], align_corners=False)  # [N,S,S,2]
    frame_index = frame_index.to(device)
    for b in torch.unique(frame_index).tolist():
        sel = (frame_index == b).nonzero(as_tuple=True)[0]
        tall = grids[sel].reshape(1, -1, size, 2)  # faces stacked vertically
        img = frames[b : b + 1].to(torch.float32)
        sampled = F.grid_sample(img, tall, mode="bilinear", padding_mode="zeros", align_corners=False)
        crops = sampled.reshape(3, len(sel), size, size).permute(1, 0, 2, 3)
        out[sel] = crops.round_().clamp_(0, 255).to(torch.uint8)
    return out


def normalize(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB crops [N,3,S,S] -> float input for the classifier, with the artifact's mean/std (0..1
    scale)."""
    m = torch.tensor(mean, device=crops.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=crops.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (crops.to(torch.float32) / 255.0 - m) / s


def bgr_to_tensor(image: npt.NDArray[np.uint8]) -> torch.Tensor:
    """An OpenCV BGR HxWx3 image as an RGB uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))


def stack_frames(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [3, H, W] uint8 frames of possibly different sizes into [B, 3, Hmax, Wmax], padding at the
    bottom/right so pixel coordinates are unchanged."""
    height = max(int(f.shape[1]) for f in frames)
    width = max(int(f.shape[2]) for f in frames)
    if all(int(f.shape[1]) == height and int(f.shape[2]) == width for f in frames):
        return torch.stack(list(frames))
    out = torch.zeros((len(frames), 3, height, width), dtype=torch.uint8, device=frames[0].device)
    for i, f in enumerate(frames):
        out[i, :, : f.shape[1], : f.shape[2]] = f
    return out


def crop_faces_bgr(
    image: npt.NDArray[np.uint8],
    landmarks: npt.NDArray[np.float32],
    size: int,
    margin: float = DEFAULT_MARGIN,
    template_name: str = DEFAULT_TEMPLATE,
) -> npt.NDArray[np.uint8]:
    """Convenience for one BGR image (trainer, eval): uint8 RGB crops [N, size, size, 3]."""
    frames = bgr_to_tensor(image).unsqueeze(0)
    lms = torch.from_numpy(np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2))
    idx = torch.zeros((lms.shape[0],), dtype=torch.int64)
    crops = align_faces(frames, idx, lms, size, margin, template_name)
    return crops.permute(0, 2, 3, 1).contiguous().numpy()
