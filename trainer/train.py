"""``genderlens train`` / ``python -m trainer``: train a face classifier and publish a model version.

Laid out like torchvision's reference scripts: :func:`get_args_parser` (the flags, generated from
:class:`~trainer.settings.TrainSettings`), :func:`train_one_epoch`, :func:`evaluate` and :func:`main`.

Steps: read the dataset (folder / UTKFace / CSV) -> detect, align and crop every image once with the
serving code (``shared.preprocess``) into an on-disk uint8 cache -> split (look-alike groups kept whole,
stratified by class and group) -> train with webcam-style augmentation, label smoothing, warm-up and
cosine decay, a checkpoint per epoch and early stopping on validation loss -> calibrate on the
validation split (``trainer.calibrate``: class-balance bias and temperature, folded into the last
layer so serving needs nothing extra) -> report on the held-out test split -> publish atomically, gate
and announce (``trainer.publish``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from tqdm import tqdm

from shared.detectors import FaceDetector
from shared.device import resolve_device
from shared.fsutil import atomic_write
from shared.models.archs import ARCHITECTURES, build_model
from shared.models.promotion import Baseline
from shared.preprocess import DEFAULT_TEMPLATE
from shared.runtime import say, setup_logging
from trainer import calibrate, gate, publish
from trainer.augment import AugmentConfig, augment
from trainer.cache import STATUS_NO_FACE, STATUS_UNREADABLE, CropCache, build_or_load
from trainer.data import Catalog, DatasetError, read_dataset
from trainer.faces import make_detector
from trainer.features import HeadFit, age_balance_weights, extract_view, fit_head, weights_digest
from trainer.pretrained import BACKBONES, Backbone, backbone_state
from trainer.proxies import proxy_accuracies
from trainer.report import classification_report
from trainer.settings import TrainSettings
from trainer.split import DUP_GROUPS_FILE, Split, make_split, read_duplicate_groups

log = logging.getLogger("trainer")

#: Keys of the resolved config that a resumed run takes from its checkpoint (they shape the run).
FORCED_ON_RESUME = (
    "arch",
    "arch_config",
    "input_size",
    "margin",
    "batch_size",
    "lr",
    "weight_decay",
    "label_smoothing",
    "seed",
    "split_seed",
    "val_fraction",
    "test_fraction",
    "no_face",
    "warmup_epochs",
    "mode",
    "template",
    "backbone_lr_scale",
)
#: The cosine decay ends at this share of each parameter group's peak learning rate, not at 0: the
#: last epochs still learn a little, and an early stop a few epochs before the end loses nothing.
LR_FLOOR = 0.02
#: bfloat16 serving is allowed when at most this share of validation labels change against float32.
BF16_MAX_FLIPS = 0.002


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags (``genderlens train`` adds them to its sub-command's parser)."""
    TrainSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """The ``genderlens`` CLI's entry point (``services/cli.py``): :func:`main`."""
    return main(args)


# ------------------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class Run:
    """What a run was told and resolved, passed down."""

    settings: TrainSettings
    config: dict[str, Any]  #: the resolved config: saved with every checkpoint, forced on resume
    mode: str  #: scratch, frozen or finetune
    backbone: Backbone | None
    device: torch.device
    started: float  #: time.time() at the start
    aug: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class Data:
    """What a run trains, calibrates and reports on."""

    catalog: Catalog
    cache: CropCache
    split: Split
    crops: torch.Tensor  #: uint8 [N, 3, S, S], one per catalog sample
    labels: torch.Tensor  #: class index per catalog sample
    mean: torch.Tensor  #: [1, 3, 1, 1] on the device
    std: torch.Tensor
    mean_std: tuple[list[float], list[float]]  #: the same, as the artifact records them
    detector: FaceDetector
    dup_path: Path
    n_unreadable: int
    n_noface: int

    @property
    def classes(self) -> list[str]:
        return self.catalog.classes

    @property
    def val_labels(self) -> torch.Tensor:
        return self.labels[torch.from_numpy(self.split.val)]

    @property
    def train_labels(self) -> torch.Tensor:
        return self.labels[torch.from_numpy(self.split.train)]


def resolve_config(settings: TrainSettings) -> tuple[dict[str, Any], str, Backbone | None]:
    """The config that shapes the run (the flags, with a pretrained backbone's own contract), the
    training mode and the backbone."""
    arch_config = settings.arch_options
    config: dict[str, Any] = {
        "arch": settings.arch,
        "arch_config": arch_config,
        "input_size": settings.input_size,
        "margin": settings.margin,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "label_smoothing": settings.label_smoothing,
        "seed": settings.seed,
        "split_seed": settings.split_seed,
        "val_fraction": settings.val_fraction,
        "test_fraction": settings.test_fraction,
        "no_face": settings.no_face,
        "warmup_epochs": settings.warmup_epochs,
        "backbone_lr_scale": settings.backbone_lr_scale,
    }
    backbone = BACKBONES.get(settings.arch)
    mode = settings.mode if settings.mode != "auto" else ("frozen" if backbone is not None else "scratch")
    if mode != "scratch" and backbone is None:
        raise SystemExit(
            f"--mode {mode}: {settings.arch!r} has no pretrained backbone ({', '.join(BACKBONES)})"
        )
    config["mode"] = mode
    config["template"] = DEFAULT_TEMPLATE
    if backbone is not None:
        # The backbone's contract: its chip size, framing and normalisation, whatever the flags say.
        config["input_size"], config["template"] = backbone.input_size, backbone.template
        if settings.head_hidden is not None:
            arch_config["hidden"] = settings.head_hidden
        arch_config["trainable_blocks"] = settings.trainable_blocks if mode == "finetune" else 0
    return config, mode, backbone


def load_checkpoint(path: Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: a new run); its config's :data:`FORCED_ON_RESUME` keys
    replace ``config``'s, as nanoGPT forces the model's shape on resume."""
    if path is None:
        return None
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SystemExit(f"--resume {path}: unreadable checkpoint ({exc})") from exc
    for key in FORCED_ON_RESUME:
        if key in checkpoint["config"] and checkpoint["config"][key] != config[key]:
            log.info("resume: %s = %r (from the checkpoint)", key, checkpoint["config"][key])
        config[key] = checkpoint["config"].get(key, config[key])
    return checkpoint


def seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def prepare_data(run: Run, catalog: Catalog) -> Data:
    """Crops (through the cache), the split and the normalisation; DatasetError when there is not
    enough to train on."""
    settings, config = run.settings, run.config
    detector = make_detector(settings.detector, settings.weights_dir)
    cache = build_or_load(
        catalog,
        settings.cache_dir,
        detector,
        config["input_size"],
        config["margin"],
        config["no_face"],
        config["template"],
    )
    n_unreadable = int((cache.status == STATUS_UNREADABLE).sum())
    n_noface = int((cache.status == STATUS_NO_FACE).sum())
    usable = cache.usable if config["no_face"] == "skip" else cache.status != STATUS_UNREADABLE
    action = (
        "excluded from training" if config["no_face"] == "skip" else "used whole, resized to the crop size"
    )
    say(
        f"preprocessing: {n_unreadable} unreadable images skipped; {n_noface} images with no detectable face "
        f"({100 * n_noface / max(1, len(catalog.samples)):.2f}%), {action}"
    )
    for i in np.nonzero(cache.status == STATUS_UNREADABLE)[0][:10].tolist():
        log.warning("unreadable image skipped: %s", catalog.samples[i].relpath)
    classes = catalog.classes
    labels = torch.tensor([classes.index(s.label) for s in catalog.samples], dtype=torch.long)
    usable_idx = np.nonzero(usable)[0].astype(np.int64)
    present = {classes[int(labels[i])] for i in usable_idx.tolist()}
    if len(present) < len(classes):
        raise DatasetError(f"class {sorted(set(classes) - present)} has no usable image after face detection")
    data_path = settings.data
    dup_path = settings.dup_groups or (
        data_path / DUP_GROUPS_FILE if data_path.is_dir() else data_path.parent / DUP_GROUPS_FILE
    )
    split = make_split(
        catalog.samples,
        usable_idx,
        read_duplicate_groups(dup_path),
        config["val_fraction"],
        config["test_fraction"],
        config.get("split_seed", config["seed"]),
    )
    if len(split.train) == 0 or len(split.val) == 0:
        raise DatasetError("too few usable images for a train/validation split")
    crops = torch.from_numpy(cache.crops)
    mean_l, std_l = _normalisation(crops, split, run.backbone)
    mean = torch.tensor(mean_l, device=run.device).view(1, 3, 1, 1)
    std = torch.tensor(std_l, device=run.device).view(1, 3, 1, 1)
    return Data(
        catalog,
        cache,
        split,
        crops,
        labels,
        mean,
        std,
        (mean_l, std_l),
        detector,
        dup_path,
        n_unreadable,
        n_noface,
    )


def _normalisation(
    crops: torch.Tensor, split: Split, backbone: Backbone | None
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std: a pretrained backbone's own, else measured on (up to 4,000) training
    chips."""
    sample = crops[torch.from_numpy(split.train[:4000])].float() / 255.0
    mean = [round(float(v), 4) for v in sample.mean(dim=(0, 2, 3))]
    std = [round(float(v), 4) for v in sample.std(dim=(0, 2, 3))]
    if backbone is not None:
        return list(backbone.mean), list(backbone.std)
    return mean, std


def create_model(run: Run, num_classes: int) -> nn.Module:
    """The architecture (with ImageNet or the backbone's pretrained weights when asked), on the device."""
    settings, config = run.settings, run.config
    if settings.pretrained:
        model = _torchvision_pretrained(config["arch"], num_classes, config["arch_config"])
    else:
        model = build_model(config["arch"], num_classes, **config["arch_config"])
    if run.backbone is not None:
        state = backbone_state(settings.arch, settings.backbone_weights, settings.backbone_cache)
        model.backbone.load_state_dict(state)  # type: ignore[union-attr]
        say(f"backbone {run.backbone.name}: pretrained weights loaded ({run.backbone.licence})")
    return model.to(run.device).to(memory_format=torch.channels_last)


def _torchvision_pretrained(arch: str, num_classes: int, config: dict[str, Any]) -> nn.Module:
    """A torchvision model with ImageNet weights, its head replaced; same state-dict layout as
    ``build_model(arch, ...)`` so the artifact loads without any download."""
    import torchvision.models as tvm

    model = build_model(arch, num_classes, **config)
    if arch == "resnet18":
        src = tvm.resnet18(weights=tvm.ResNet18_Weights.DEFAULT)
    elif arch == "mobilenet_v3_small":
        src = tvm.mobilenet_v3_small(weights=tvm.MobileNet_V3_Small_Weights.DEFAULT)
    else:
        raise SystemExit(f"--pretrained: no pretrained weights for {arch!r}")
    target = model.state_dict()
    loaded = {k: v for k, v in src.state_dict().items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(loaded, strict=False)
    log.info("pretrained: %d/%d tensors from torchvision", len(loaded), len(target))
    return model


# ------------------------------------------------------------------------------------------ optimisation
def param_groups(model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights only; a pretrained backbone's trainable blocks learn at
    ``backbone_lr_scale`` of the head's rate (frozen parameters are left out)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("backbone."), p.ndim > 1), []).append(p)
    scale = float(config.get("backbone_lr_scale", 1.0))
    return [
        {
            "params": params,
            "weight_decay": config["weight_decay"] if decayed else 0.0,
            "lr_scale": scale if in_backbone else 1.0,
            "lr": (scale if in_backbone else 1.0) * config["lr"],
        }
        for (in_backbone, decayed), params in sorted(groups.items())
    ]


class CosineToFloor(CosineAnnealingLR):
    """Cosine annealing down to ``floor`` times each parameter group's own peak rate.

    torch's ``eta_min`` is one absolute rate for every group, but a fine-tuned backbone's groups peak
    at a fraction of the head's rate and must end at the same fraction of the head's floor. Computed
    in closed form at every step (torch's chained form drifts by rounding)."""

    def __init__(self, optimizer: Optimizer, T_max: int, floor: float) -> None:  # noqa: N803 (torch's name)
        self.floor = floor
        super().__init__(optimizer, T_max=T_max)

    def get_lr(self) -> list[float | torch.Tensor]:
        progress = min(1.0, self.last_epoch / self.T_max)
        return [
            base * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))
            for base in self.base_lrs
        ]

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        return self.get_lr()


def make_scheduler(
    optimizer: Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float
) -> LRScheduler:
    """Per batch: a linear warm-up to each group's rate over ``warmup_epochs``, then cosine decay to
    :data:`LR_FLOOR` of it at the last batch of the last epoch."""
    warmup = int(warmup_epochs * steps_per_epoch)
    total = steps_per_epoch * epochs
    linear = LinearLR(
        optimizer, start_factor=1 / max(1, warmup), end_factor=1.0, total_iters=max(1, warmup - 1)
    )
    cosine = CosineToFloor(optimizer, T_max=max(1, total - warmup), floor=LR_FLOOR)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def restore_schedule(
    scheduler: LRScheduler, saved: dict[str, Any] | None, shape: dict[str, Any], done: int
) -> None:
    """Continue the schedule of a resumed run: its saved state when the run keeps its length; else
    (``--epochs`` changed, or a checkpoint from before schedules were saved) the new length's schedule
    at the same step, as the schedule always follows the run's length."""
    if saved is not None and saved.get("shape") == shape:
        scheduler.load_state_dict(saved["state"])
    else:
        with warnings.catch_warnings():  # "step() before optimizer.step()": replaying, not training
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(done):
                scheduler.step()
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


# ------------------------------------------------------------------------------------------ training
@dataclass
class Progress:
    """The epoch loop's state, saved in every checkpoint."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float = float("inf")
    best_state: dict[str, torch.Tensor] | None = None
    #: The epoch whose weights ``best_state`` holds; after a head fitted on frozen features, the head's
    #: best epoch (``frozen``) or 0, the head before any fine-tuning epoch (``finetune``).
    best_epoch: int = 0
    bad_epochs: int = 0
    start_epoch: int = 0
    stopped: str = "max epochs"
    checkpoint_dir: Path = Path()

    def record(self, row: dict[str, float], model: nn.Module) -> bool:
        """Add an epoch's figures; keep the weights when validation loss improved. True if it did."""
        self.history.append(row)
        improved = row["val_loss"] < self.best_val - 1e-4
        if improved:
            self.best_val, self.bad_epochs, self.best_epoch = row["val_loss"], 0, int(row["epoch"])
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return improved


def train_one_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    data: Data,
    epoch: int,
    run: Run,
) -> dict[str, float]:
    """One pass over the training split, augmented, in an order seeded by the epoch (a resumed run
    draws what an uninterrupted one would); the schedule steps every batch. Returns the epoch's
    training loss and accuracy and the last batch's learning rate."""
    config, device = run.config, run.device
    model.train()
    gen = torch.Generator().manual_seed(config["seed"] * 100_003 + epoch)
    order = torch.randperm(len(data.split.train), generator=gen)
    batch, train_labels = config["batch_size"], data.train_labels
    steps = math.ceil(len(data.split.train) / batch)
    tot_loss = tot_correct = seen = 0.0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch + 1}/{run.settings.epochs}",
        unit="batch",
        mininterval=1.0,
        leave=False,
    )
    for step in bar:
        sel = order[step * batch : (step + 1) * batch]
        idx = torch.from_numpy(data.split.train)[sel]
        y = train_labels[sel].to(device)
        x = augment(data.crops[idx], gen, run.aug, device)
        x = ((x - data.mean) / data.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        n = len(sel)
        tot_loss += loss.item() * n
        tot_correct += float((logits.argmax(1) == y).sum())
        seen += n
        bar.set_postfix(loss=f"{tot_loss / seen:.4f}", acc=f"{tot_correct / seen:.4f}")
    bar.close()
    return {"train_loss": tot_loss / seen, "train_acc": tot_correct / seen, "lr": lr}


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    crops: torch.Tensor,
    idx: npt.NDArray[np.int64],
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch: int = 512,
) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(idx), batch):
        x = crops[torch.from_numpy(idx[start : start + batch])].to(device).float() / 255.0
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


def evaluate(model: nn.Module, data: Data, device: torch.device) -> tuple[float, float]:
    """Validation loss and accuracy, without augmentation, in inference mode."""
    logits = predict_logits(model, data.crops, data.split.val, data.mean, data.std, device)
    labels = data.val_labels
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def fit_head_on_features(run: Run, model: nn.Module, data: Data) -> HeadFit:
    """Embed every chip once per view (cached, resumable), then fit the model's head on them."""
    settings, config, split = run.settings, run.config, data.split
    embed: Callable[[torch.Tensor], torch.Tensor] = model.embed  # type: ignore[assignment]
    key = f"{data.cache.path.name}-{weights_digest(model.backbone)}"  # type: ignore[arg-type]
    root = settings.cache_dir / "features" / key
    both = np.concatenate([split.train, split.val])
    model.eval()
    views = {"plain": both, "flip": split.train}
    views.update({f"aug{k + 1}": split.train for k in range(settings.feature_views)})
    feats = {
        v: extract_view(embed, data.crops, idx, v, root / v, data.mean, data.std, run.device, run.aug)
        for v, idx in views.items()
    }
    pos = {int(i): j for j, i in enumerate(both.tolist())}
    n_train = len(split.train)
    train_x = torch.cat([feats["plain"].values[:n_train]] + [feats[v].values for v in views if v != "plain"])
    train_y = data.train_labels.repeat(len(views))
    val_x = feats["plain"].values[torch.tensor([pos[int(i)] for i in split.val.tolist()])]
    head: nn.Module = model.head  # type: ignore[assignment]
    weights = None
    if settings.balance_ages:
        ages = [data.catalog.samples[i].age for i in split.train.tolist()]
        weights = age_balance_weights(ages).repeat(len(views))
    fit = fit_head(
        head.cpu(),
        train_x,
        train_y,
        val_x,
        data.val_labels,
        epochs=settings.head_epochs,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        label_smoothing=config["label_smoothing"],
        seed=config["seed"],
        sample_weight=weights,
    )
    head.load_state_dict(fit.state)
    head.to(run.device)
    say(
        f"head fitted on {len(train_x)} embeddings ({len(views)} views): best epoch {fit.best_epoch}, "
        f"val loss {fit.val_loss:.4f} acc {fit.val_acc:.4f}"
    )
    return fit


def train(run: Run, model: nn.Module, data: Data, checkpoint: dict[str, Any] | None) -> Progress:
    """The epoch loop (after the head is fitted on cached embeddings, for a pretrained backbone): per
    epoch train, validate, checkpoint; early stopping, time budget. Returns where it stopped."""
    settings, config = run.settings, run.config
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=run.device.type == "cuda")
    run_name = f"{settings.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    progress = Progress(checkpoint_dir=settings.checkpoint_dir or (settings.cache_dir / "runs" / run_name))
    if checkpoint is not None:
        _resume(run, model, optimizer, scaler, progress, checkpoint)
    steps_per_epoch = math.ceil(len(data.split.train) / config["batch_size"])
    shape = {
        "steps_per_epoch": steps_per_epoch,
        "epochs": settings.epochs,
        "warmup_epochs": config["warmup_epochs"],
    }
    scheduler = make_scheduler(optimizer, steps_per_epoch, settings.epochs, config["warmup_epochs"])
    if checkpoint is not None:
        restore_schedule(scheduler, checkpoint.get("schedule"), shape, progress.start_epoch * steps_per_epoch)
    epochs = settings.epochs
    if run.mode != "scratch" and checkpoint is None:
        fit = fit_head_on_features(run, model, data)
        progress.history = fit.history
        # The fitted head is the first candidate: a fine-tuning epoch is kept only when it beats it on
        # validation loss (the same measure: cross-entropy of the plain validation chips).
        progress.best_val = fit.val_loss
        progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        progress.best_epoch = fit.best_epoch if run.mode == "frozen" else 0
        if run.mode == "frozen":
            epochs, progress.stopped = 0, "head fitted on frozen features"
    for epoch in range(progress.start_epoch, epochs):
        if progress.bad_epochs >= settings.patience:
            progress.stopped = "early stopping"
            break
        trained = train_one_epoch(model, optimizer, scheduler, scaler, data, epoch, run)
        val_loss, val_acc = evaluate(model, data, run.device)
        row = {
            "epoch": epoch + 1,
            "train_loss": trained["train_loss"],
            "train_acc": trained["train_acc"],
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": trained["lr"],
            "elapsed_s": time.time() - run.started,
        }
        improved = progress.record(row, model)
        say(
            f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}{' *' if improved else ''}"
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "schedule": {"shape": shape, "state": scheduler.state_dict()},
            "rng": rng_state(run.device),
        }
        save_checkpoint(progress, state, epoch, config, data.classes)
        if settings.max_minutes and time.time() - run.started > settings.max_minutes * 60:
            progress.stopped = f"time budget ({settings.max_minutes} min)"
            break
    else:
        if epochs:
            progress.stopped = "max epochs" if progress.bad_epochs < settings.patience else "early stopping"
    return progress


def _resume(
    run: Run,
    model: nn.Module,
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    checkpoint: dict[str, Any],
) -> None:
    """Load a checkpoint's weights, optimiser and loop state (the schedule: :func:`restore_schedule`)."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # the peak rates: the schedule is rebuilt on them
        group["lr"] = group["lr_scale"] * run.config["lr"]
        group.pop("initial_lr", None)
    if "scaler" in checkpoint and run.device.type == "cuda":
        scaler.load_state_dict(checkpoint["scaler"])
    if "rng" in checkpoint:  # checkpoints from before it was saved resume with a fresh draw
        set_rng_state(checkpoint["rng"], run.device)
    progress.history = list(checkpoint["history"])
    progress.best_val, progress.best_state = float(checkpoint["best_val_loss"]), checkpoint["best_state"]
    # A checkpoint from before best_epoch was saved: the epoch of the lowest validation loss.
    fallback = min(progress.history, key=lambda h: h["val_loss"])["epoch"] if progress.history else 0
    progress.best_epoch = int(checkpoint.get("best_epoch", fallback))
    progress.bad_epochs, progress.start_epoch = int(checkpoint["bad_epochs"]), int(checkpoint["epoch"]) + 1
    if run.settings.checkpoint_dir is None and run.settings.resume is not None:
        progress.checkpoint_dir = run.settings.resume.parent
    say(f"resumed from {run.settings.resume} at epoch {progress.start_epoch}")


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's global generators (dropout draws from them; the data order and augmentation have
    generators seeded per epoch), so that a resumed run draws what the uninterrupted one would."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    progress: Progress, state: dict[str, Any], epoch: int, config: dict[str, Any], classes: list[str]
) -> None:
    """``checkpoint.pt`` in the run's folder, atomically: weights, optimiser, scaler, schedule and
    random state (``state``), the epoch, the resolved config and the loop's state."""
    checkpoint = {
        **state,
        "epoch": epoch,
        "config": config,
        "history": progress.history,
        "best_state": progress.best_state,
        "best_val_loss": progress.best_val,
        "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad_epochs,
        "classes": classes,
    }
    atomic_write(progress.checkpoint_dir / "checkpoint.pt", lambda fh: torch.save(checkpoint, fh))


# ------------------------------------------------------------------------------------------ reports
def bf16_agrees(model: nn.Module, data: Data, report: dict[str, Any]) -> bool:
    """Compare float32 and bfloat16 CPU forward passes on the validation chips (only where this CPU
    computes bf16 natively: elsewhere it is slow and the artifact is served in float32 anyway).
    Records the figures under ``report["cpu_bf16"]``."""
    from shared.models.artifact import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        report["cpu_bf16"] = {"checked": False, "reason": "no native bf16 on the training CPU"}
        return False
    cpu_model = copy.deepcopy(model).cpu().eval()
    crops = data.crops[torch.from_numpy(data.split.val)]
    idx = np.arange(len(crops))
    cpu = torch.device("cpu")
    m, s = data.mean.cpu(), data.std.cpu()
    fp32 = predict_logits(cpu_model, crops, idx, m, s, cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = predict_logits(cpu_model, crops, idx, m, s, cpu)
    flips = float((fp32.argmax(1) != bf16.argmax(1)).float().mean())
    diff = float((fp32.softmax(1) - bf16.softmax(1)).abs().max())
    report["cpu_bf16"] = {"checked": True, "label_flips": flips, "max_prob_diff": diff}
    say(f"bfloat16 on CPU: {100 * flips:.2f}% of validation labels change, max probability change {diff:.4f}")
    return flips <= BF16_MAX_FLIPS


def summary_line(report: dict[str, Any]) -> str:
    """Accuracy, the proxies, and the breakdowns that choices are made on (validation split)."""

    def acc(rows: dict[str, Any]) -> str:
        return ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in rows.items())

    proxies = ", ".join(f"{k} {100 * v:.2f}" for k, v in report.get("proxies", {}).items())
    return (
        f"accuracy {100 * report['accuracy']:.2f}% (NLL {report['nll']:.4f}, ECE {report['ece']:.4f}); "
        f"proxies: {proxies}; per class: {acc(report['per_class'])}; per group: {acc(report['per_group'])}; "
        f"per age: {acc(report['per_age'])}"
    )


def make_reports(
    run: Run, model: nn.Module, data: Data, cal: calibrate.Calibration
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The test report (validation when there is no test split), the validation report with the
    proxies, and whether bfloat16 serving is allowed."""
    split, samples, device = data.split, data.catalog.samples, run.device
    eval_idx = split.test if len(split.test) else split.val
    test_probs = torch.softmax(
        predict_logits(model, data.crops, eval_idx, data.mean, data.std, device), dim=1
    ).numpy()
    test_labels = data.labels[torch.from_numpy(eval_idx)].numpy()
    report = classification_report(
        test_probs,
        test_labels,
        data.classes,
        [samples[i].group for i in eval_idx.tolist()],
        [samples[i].age for i in eval_idx.tolist()],
    )
    val_report = classification_report(
        cal.val_probs.numpy(),
        data.val_labels.numpy(),
        data.classes,
        [samples[i].group for i in split.val.tolist()],
        [samples[i].age for i in split.val.tolist()],
    )
    val_crops = data.crops[torch.from_numpy(split.val)]
    cpu_bf16 = run.backbone is not None and bf16_agrees(model, data, val_report)
    val_report["proxies"] = proxy_accuracies(
        lambda c: predict_logits(model, c, np.arange(len(c)), data.mean, data.std, device),
        val_crops,
        data.val_labels,
    )
    say("validation: " + summary_line(val_report))
    conf = test_probs.max(axis=1)
    report["uncertain_rate"] = float((conf < cal.threshold).mean())
    certain = conf >= cal.threshold
    report["accuracy_when_certain"] = (
        float((test_probs.argmax(1) == test_labels)[certain].mean()) if certain.any() else None
    )
    return report, val_report, cpu_bf16


def training_info(
    run: Run, data: Data, progress: Progress, best_epoch: int, cal: calibrate.Calibration
) -> dict[str, Any]:
    """How the model was made, for the artifact and the report."""
    settings, catalog, split = run.settings, data.catalog, data.split
    return {
        "command": publish.command_line(),
        "wall_time_s": round(time.time() - run.started, 1),
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(run.device),
            "torch": torch.__version__,
        },
        "epochs_run": len(progress.history),
        "best_epoch": best_epoch,
        "stopped": progress.stopped,
        "split": {
            "train": len(split.train),
            "val": len(split.val),
            "test": len(split.test),
            "look_alike_groups_file": str(data.dup_path) if data.dup_path.is_file() else None,
        },
        "preprocessing": {
            "images": len(catalog.samples),
            "skipped_files": len(catalog.skipped),
            "unreadable": data.n_unreadable,
            "no_face": data.n_noface,
            "no_face_policy": run.config["no_face"],
            "detector": settings.detector,
            "score_threshold": getattr(getattr(data.detector, "config", None), "score_threshold", None),
        },
        "config": run.config,
        "augment": asdict(run.aug),
        "calibration": {"bias_class1": cal.bias, "temperature": cal.temperature, "flip_tta": cal.flip_tta},
        "history": progress.history,
    }


# ------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    settings = TrainSettings.from_args("train", args)  # bad flags or variables fail now, not after training
    setup_logging(settings.log_level, replace=False)
    started = time.time()
    git_commit = publish.git_commit()  # the code this run starts with (files may change while it trains)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    config, mode, backbone = resolve_config(settings)
    checkpoint = load_checkpoint(settings.resume, config)
    device = resolve_device(settings.device, "genderlens train")
    seed_everything(config["seed"], device)
    run = Run(settings, config, mode, backbone, device, started)
    try:
        catalog = read_dataset(settings.data, settings.format)
        say(
            f"dataset {settings.data}: {len(catalog.samples)} images, classes {catalog.counts()}, "
            f"{len(catalog.skipped)} files skipped (not images / bad names)"
        )
        data = prepare_data(run, catalog)
    except DatasetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    model = create_model(run, len(data.classes))
    progress = train(run, model, data, checkpoint)
    if progress.best_state is None:
        sys.stderr.write("error: no epoch was trained\n")
        return 2
    model.load_state_dict(progress.best_state)
    best_epoch = progress.best_epoch
    best = (
        f"epoch {best_epoch}"
        if best_epoch or run.mode != "finetune"
        else "the fitted head (no fine-tuning epoch beat it)"
    )
    say(
        f"training stopped ({progress.stopped}); best: {best} (val loss {progress.best_val:.4f}); "
        f"checkpoints in {progress.checkpoint_dir}"
    )
    cal = _calibrate(run, model, data)
    report, val_report, cpu_bf16 = make_reports(run, model, data, cal)
    info = training_info(run, data, progress, best_epoch, cal)
    full_report = {"test": report, "validation": val_report, "training": info}
    per_class = ", ".join(f"{k}: {v['accuracy']:.4f}" for k, v in report["per_class"].items())
    say(f"test split: accuracy {report['accuracy']:.4f}, ECE {report['ece']:.4f}, per class {per_class}")
    if settings.no_publish:
        publish.write_report(progress.checkpoint_dir, full_report, progress.history)
        return 0
    meta = publish.artifact_meta(
        settings,
        config,
        data.classes,
        mode=mode,
        backbone=backbone.name if backbone is not None else None,
        cpu_bf16=cpu_bf16,
        mean_std=data.mean_std,
        threshold=cal.threshold,
        fingerprint=data.cache.fingerprint,
        git_commit=git_commit,
        full_report=full_report,
    )
    publish.publish_gated(settings, model, meta, full_report, progress.history, _baseline(run, data))
    return 0


def _calibrate(run: Run, model: nn.Module, data: Data) -> calibrate.Calibration:
    """Calibrate on validation (``trainer.calibrate``); records flip averaging in the arch config."""
    can_flip = "flip_tta" in inspect.signature(ARCHITECTURES[run.config["arch"]]).parameters
    cal = calibrate.calibrate(
        model,
        lambda: predict_logits(model, data.crops, data.split.val, data.mean, data.std, run.device),
        data.val_labels,
        run.settings.flip_tta if can_flip else None,
    )
    if can_flip:
        run.config["arch_config"] = {**run.config["arch_config"], "flip_tta": cal.flip_tta}
    return cal


def _baseline(run: Run, data: Data) -> Baseline:
    """The promotion gate's like-with-like figures: the current model on this run's validation images
    (``trainer.gate``)."""
    config, val = run.config, data.split.val
    return gate.baseline_on_split(
        run.settings.out,
        data.classes,
        [data.catalog.samples[i] for i in val.tolist()],
        data.catalog.root,
        data.detector,
        run.settings.cache_dir,
        config["no_face"],
        run.device,
        data.cache.fingerprint,
        {k: config[k] for k in ("split_seed", "val_fraction", "test_fraction")},
        own_crops=(
            gate.contract(config["input_size"], config["margin"], config["template"]),
            data.crops[torch.from_numpy(val)],
        ),
    )
