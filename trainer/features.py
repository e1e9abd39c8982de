"""Frozen-backbone training: embeddings computed once, cached on disk, and a head fitted on them.

A pretrained backbone that does not train gives the same embedding for a chip every epoch, so the
trainer computes it once per *view* of each chip and keeps it: ``plain`` and ``flip`` for every usable
chip, and ``aug1..augK`` (the trainer's own webcam-style augmentation, seeded) for the training split,
so the head also learns from grayscale, dark, blurred and JPEG-damaged faces; ``gray`` and ``dark``
(the validation proxies of :mod:`trainer.proxies`) for choosing head settings. Fitting the head then
takes seconds, and a later run with other head settings starts at once.

The cache is written in chunks (``chunk-00012.npy``), each atomically, so an interrupted extraction
resumes at the first missing chunk; the folder's name covers the crop cache, the backbone weights and
the view, so anything that changes the embeddings makes a new cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shared.fsutil import atomic_write
from trainer.augment import AugmentConfig, augment
from trainer.proxies import darken, grayscale

log = logging.getLogger(__name__)

CHUNK: Final = 1024


@dataclass(frozen=True)
class FeatureSet:
    """Embeddings [N, D] (float32) of the chips at ``index`` (catalog indices), in that order."""

    index: npt.NDArray[np.int64]
    values: torch.Tensor


def weights_digest(module: nn.Module) -> str:
    """A short digest of a module's weights: part of the feature cache's key."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _view_batch(
    crops: torch.Tensor, view: str, seed: int, cfg: AugmentConfig, device: torch.device
) -> torch.Tensor:
    """uint8 crops -> float 0..1 batch of the given view, on ``device``."""
    if view == "plain":
        return crops.to(device).float() / 255.0
    if view == "flip":
        return crops.to(device).float().flip(3) / 255.0
    if view == "gray":
        return grayscale(crops).to(device).float() / 255.0
    if view == "dark":
        return darken(crops, seed).to(device).float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    return augment(crops, gen, cfg, device)


@torch.inference_mode()
def extract_view(
    embed: Callable[[torch.Tensor], torch.Tensor],
    crops: torch.Tensor,
    index: npt.NDArray[np.int64],
    view: str,
    folder: Path,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    aug_cfg: AugmentConfig | None = None,
    batch: int = 64,
) -> FeatureSet:
    """Embeddings of ``crops[index]`` in one view, cached chunk by chunk under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = aug_cfg or AugmentConfig()
    parts: list[torch.Tensor] = []
    n_chunks = (len(index) + CHUNK - 1) // CHUNK
    done = sum(1 for c in range(n_chunks) if (folder / f"chunk-{c:05d}.npy").is_file())
    bar = tqdm(total=len(index), desc=f"features {view}", unit="img", mininterval=5, initial=done * CHUNK)
    for c in range(n_chunks):
        path = folder / f"chunk-{c:05d}.npy"
        sel = index[c * CHUNK : (c + 1) * CHUNK]
        if path.is_file():
            arr = np.load(path)
            if arr.shape[0] == len(sel):
                parts.append(torch.from_numpy(arr))
                continue
        out = []
        for start in range(0, len(sel), batch):
            idx = torch.from_numpy(sel[start : start + batch])
            seed = int(hashlib.sha256(f"{view}:{c}:{start}".encode()).hexdigest()[:8], 16)
            x = _view_batch(crops[idx], view, seed, cfg, device)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            out.append(embed(x).float().cpu())
            bar.update(len(idx))
        values = torch.cat(out)
        atomic_write(path, functools.partial(np.save, arr=values.numpy()))
        parts.append(values)
    bar.close()
    return FeatureSet(index, torch.cat(parts) if parts else torch.zeros((0, 0)))


def age_balance_weights(ages: list[str | None], cap: float = 4.0) -> torch.Tensor:
    """Per-sample weights that give every age band the same total weight (at most ``cap`` times the
    largest band's per-image weight), normalised to mean 1; images without an age weigh 1."""
    counts: dict[str | None, int] = {}
    for a in ages:
        counts[a] = counts.get(a, 0) + 1
    top = max((n for a, n in counts.items() if a is not None), default=1)
    w = torch.tensor([1.0 if a is None else min(cap, top / counts[a]) for a in ages])
    return w / w.mean()


@dataclass
class HeadFit:
    state: dict[str, torch.Tensor]
    best_epoch: int
    val_loss: float
    val_acc: float
    history: list[dict[str, float]]


def fit_head(
    head: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int = 60,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    batch: int = 512,
    seed: int = 0,
    sample_weight: torch.Tensor | None = None,
) -> HeadFit:
    """Fit ``head`` on embeddings with AdamW and a cosine schedule; keep the epoch with the lowest
    validation loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train_x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    best: HeadFit | None = None
    history: list[dict[str, float]] = []
    w = sample_weight if sample_weight is not None else torch.ones(len(train_x))
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch):
            sel = order[start : start + batch]
            logits = head(train_x[sel])
            loss = F.cross_entropy(logits, train_y[sel], label_smoothing=label_smoothing, reduction="none")
            loss = (loss * w[sel]).sum() / w[sel].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(sel)
        head.eval()
        with torch.no_grad():
            val_logits = head(val_x)
            val_loss = float(F.cross_entropy(val_logits, val_y))
            val_acc = float((val_logits.argmax(1) == val_y).float().mean())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / len(order),
                "train_acc": float("nan"),
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": float(opt.param_groups[0]["lr"]),
            }
        )
        if best is None or val_loss < best.val_loss:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best = HeadFit(state, epoch + 1, val_loss, val_acc, history)
    assert best is not None
    best.history = history
    return best
