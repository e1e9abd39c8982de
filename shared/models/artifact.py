"""The model artifact: one directory per version, carrying its own contract.

``MODELS_DIR/<name>-<version>/``
  ``model.safetensors``  weights (safetensors: loading never unpickles anything)
  ``model.json``         :class:`ModelMeta`: architecture and config, classes, input size, framing
                         margin, normalisation, preprocessing version, metrics, data fingerprint,
                         creation time, trainer git commit
``MODELS_DIR/current``   a text file naming the current version's directory

:func:`publish` is atomic (temp dir, fsync, rename, then an atomic replace of ``current``), so a killed
publish leaves the previous ``current`` intact. :func:`load_artifact` validates the contract and runs a
probe forward pass before it returns anything: a broken or incompatible artifact is refused whole,
never half-loaded.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from shared.constants import UNCERTAIN, UNKNOWN
from shared.fsutil import atomic_write, fsync_dir, write_synced
from shared.models.archs import ARCH_LIMITS, ARCHITECTURES, MAX_PARAMETERS, build_model
from shared.preprocess import DEFAULT_TEMPLATE, PREPROCESS_VERSION, TEMPLATES, normalize
from shared.schema import MAX_CLASSES

log = logging.getLogger(__name__)

ARTIFACT_FORMAT: Final = 1
WEIGHTS_FILE: Final = "model.safetensors"
META_FILE: Final = "model.json"
CURRENT_FILE: Final = "current"


class ArtifactError(RuntimeError):
    """An artifact that must not be served; the message says why."""


class ModelMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = ARTIFACT_FORMAT
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]*$")
    arch: str
    arch_config: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] = Field(min_length=2, max_length=MAX_CLASSES)
    input_size: int = Field(ge=16, le=512)
    margin: float = Field(gt=0.2, le=4.0)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    preprocess_version: int
    #: The alignment template the crops are framed with (``shared.preprocess.TEMPLATES``): part of the
    #: contract, because a pretrained backbone expects the framing it was trained on.
    template: str = DEFAULT_TEMPLATE
    #: What the model is, for people (``models list``): the pretrained backbone it is built on (None:
    #: trained from scratch) and how it was trained ("scratch", "frozen": backbone features + a trained
    #: head, "finetune": the backbone's last blocks trained too).
    backbone: str | None = None
    mode: str | None = None
    #: Serve the forward pass in bfloat16 on CPUs that compute it natively (AVX512-BF16 / AMX): set by
    #: the trainer only when the validation split's labels agree with float32 (see the model card).
    cpu_bf16: bool = False
    #: Below this top-class probability a face is reported as ``uncertain`` (the serving setting may
    #: override it); chosen on the validation split, see the model card.
    uncertain_threshold: float = Field(0.6, ge=0.0, le=1.0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_fingerprint: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    git_commit: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or any(c in (UNCERTAIN, UNKNOWN) or not c for c in value):
            raise ValueError("class names must be unique, non-empty and not 'uncertain'/'unknown'")
        return value

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


def new_version() -> str:
    """A sortable, unique version string (UTC time plus a short random suffix)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "." + secrets.token_hex(2)


def write_artifact_dir(
    target: Path, model: nn.Module, meta: ModelMeta, extra_files: Mapping[str, bytes] | None = None
) -> None:
    """Write weights, metadata and any extra files (report, plots) into an existing, empty directory
    (fsynced)."""
    from safetensors.torch import save as st_save

    for fname in extra_files or {}:
        if "/" in fname or fname.startswith(".") or fname in (WEIGHTS_FILE, META_FILE):
            raise ValueError(f"invalid extra artifact file name {fname!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_synced(target / WEIGHTS_FILE, st_save(state, metadata={"format": str(ARTIFACT_FORMAT)}))
    for fname, data in (extra_files or {}).items():
        write_synced(target / fname, data)
    write_synced(target / META_FILE, meta.model_dump_json(indent=2).encode())
    fsync_dir(target)


def set_current(models_dir: Path, dirname: str) -> None:
    """Atomically point ``current`` at ``dirname`` (which must hold a complete artifact)."""
    if not (models_dir / dirname / META_FILE).is_file():
        raise ArtifactError(f"{models_dir / dirname} is not a model artifact")
    atomic_write(models_dir / CURRENT_FILE, (dirname + "\n").encode())
    fsync_dir(models_dir)


def publish(
    models_dir: Path,
    model: nn.Module,
    meta: ModelMeta,
    make_current: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a new artifact version atomically and (by default) make it current. Returns its path.
    ``extra_files`` (name -> bytes: the training report and its plots) go into the same directory."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / meta.dirname
    if final.exists():
        raise ArtifactError(f"{final} already exists; versions are immutable")
    tmp = models_dir / f".tmp-{meta.dirname}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write_artifact_dir(tmp, model, meta, extra_files)
        tmp.rename(final)
        fsync_dir(models_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(models_dir, meta.dirname)
    return final


def publish_untrained(
    models_dir: Path,
    *,
    name: str = "untrained",
    version: str = "0",
    width: int = 32,
    seed: int = 0,
    model: nn.Module | None = None,
    make_current: bool = True,
    **meta_fields: Any,
) -> ModelMeta:
    """Publish a complete artifact of an untrained ``gendernet`` (or of ``model``, a gendernet of that
    ``width``): real files, real loading path, meaningless labels. For speed benchmarks and tests that
    exercise the artifact machinery, never for serving people."""
    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "arch": "gendernet",
        "arch_config": {"width": width},
        "classes": ["female", "male"],
        "input_size": 64,
        "margin": 1.0,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "preprocess_version": PREPROCESS_VERSION,
        **meta_fields,
    }
    meta = ModelMeta(**fields)
    publish(
        models_dir,
        model if model is not None else build_model("gendernet", 2, width=width),
        meta,
        make_current,
    )
    return meta


def inside(path: Path, root: Path, what: str) -> Path:
    """``path`` with every symlink resolved; ArtifactError unless that lies inside ``root`` (itself
    resolved, so a models folder that is a symlink, a mounted volume, is fine). A symlink in the
    models folder must never make a worker load (or a tool read) files from elsewhere."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise ArtifactError(f"{path}: {what} resolves to {resolved}, outside {base}; refused")
    return resolved


def current_dir(models_dir: Path) -> Path | None:
    """The directory ``current`` points at, or None when there is no (valid) pointer. The pointer and
    the directory must both lie inside ``models_dir`` once symlinks are resolved."""
    pointer = models_dir / CURRENT_FILE
    if not pointer.exists() and not pointer.is_symlink():
        return None
    inside(pointer, models_dir, "the current pointer")
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise ArtifactError(f"{pointer} holds an invalid name {name[:80]!r}")
    inside(models_dir / name, models_dir, "the current version")
    return models_dir / name


def list_versions(models_dir: Path) -> list[ModelMeta]:
    """Every complete artifact under ``models_dir`` (unreadable ones skipped), oldest first."""
    metas = []
    if not models_dir.is_dir():
        return []
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith(".") or not (child / META_FILE).is_file():
            continue
        try:
            inside(child, models_dir, "a version directory")
            metas.append(read_meta(child))
        except ArtifactError as exc:
            log.warning("skipping %s: %s", child, exc)
    return sorted(metas, key=lambda m: m.created_at)


def read_meta(path: Path) -> ModelMeta:
    """The artifact's validated metadata: contract, versions, and an ``arch_config`` within the
    bounds its architecture declares (checked before anything is built from it)."""
    try:
        raw = json.loads(inside(path / META_FILE, path, META_FILE).read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no {META_FILE}") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / META_FILE}: unreadable ({exc})") from exc
    try:
        meta = ModelMeta.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{path / META_FILE}: invalid metadata: {exc}") from exc
    if meta.format != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: artifact format {meta.format}, this code reads {ARTIFACT_FORMAT}")
    if meta.preprocess_version != PREPROCESS_VERSION:
        raise ArtifactError(
            f"{path}: made with preprocessing v{meta.preprocess_version}, this code serves "
            f"v{PREPROCESS_VERSION}"
        )
    if meta.arch not in ARCHITECTURES:
        raise ArtifactError(f"{path}: unknown architecture {meta.arch!r}")
    for key, (low, high) in ARCH_LIMITS.get(meta.arch, {}).items():
        value = meta.arch_config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ArtifactError(
                f"{path}: arch_config {key}={str(value)[:40]} is outside {meta.arch}'s bounds [{low:g}, {high:g}]"
            )
    if meta.template not in TEMPLATES:
        raise ArtifactError(f"{path}: unknown alignment template {meta.template!r}")
    return meta


def count_parameters(meta: ModelMeta) -> int:
    """Parameters of the model ``meta`` describes, built on the meta device: no memory, no weights,
    so an absurd config costs nothing. ArtifactError past ``MAX_PARAMETERS`` or when it cannot be
    built at all."""
    try:
        with torch.device("meta"):
            module = build_model(meta.arch, num_classes=len(meta.classes), **meta.arch_config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"cannot build {meta.arch} with {meta.arch_config}: {exc}") from exc
    count = sum(p.numel() for p in module.parameters())
    if count > MAX_PARAMETERS:
        raise ArtifactError(
            f"{meta.arch} {meta.arch_config} has {count:,} parameters, more than {MAX_PARAMETERS:,}"
        )
    return count


def probe_input(meta: ModelMeta, n: int = 2) -> torch.Tensor:
    """A fixed, built-in probe batch (uint8 gradient crops) for the load-time forward pass."""
    s = meta.input_size
    ramp = torch.linspace(0, 255, s).round().to(torch.uint8)
    img = torch.stack(
        [ramp.view(1, s).expand(s, s), ramp.view(s, 1).expand(s, s), ramp.flip(0).view(1, s).expand(s, s)]
    )
    return img.unsqueeze(0).repeat(n, 1, 1, 1)


@dataclass
class Classifier:
    """A validated, ready-to-serve model."""

    meta: ModelMeta
    module: nn.Module
    device: torch.device
    path: Path
    #: bfloat16 autocast on this CPU (the artifact allows it and the CPU computes bf16 natively).
    cpu_bf16: bool = False

    @torch.inference_mode()
    def predict(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 RGB crops [N,3,S,S] (from ``shared.preprocess.align_faces``) -> probabilities [N,C]."""
        if crops.shape[0] == 0:
            return torch.zeros((0, len(self.meta.classes)))
        x = normalize(crops.to(self.device, non_blocking=True), self.meta.mean, self.meta.std)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.module(x)
        elif self.cpu_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.module(x)
        else:
            logits = self.module(x)
        return torch.softmax(logits.float(), dim=1)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_artifact(path: Path, device: str | torch.device = "cpu") -> Classifier:
    """Load and validate an artifact directory; raises :class:`ArtifactError` on anything wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    started = time.perf_counter()
    meta = read_meta(path)
    count_parameters(meta)  # before the weights are read or anything is allocated
    try:
        state = load_file(str(inside(path / WEIGHTS_FILE, path, WEIGHTS_FILE)), device="cpu")
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path / WEIGHTS_FILE}: unreadable weights ({exc})") from exc
    try:
        module = build_model(meta.arch, num_classes=len(meta.classes), **meta.arch_config)
        module.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: weights do not fit {meta.arch} {meta.arch_config}: {exc}") from exc
    dev = torch.device(device)
    module = module.to(dev).eval().to(memory_format=torch.channels_last)
    bf16 = meta.cpu_bf16 and dev.type == "cpu" and cpu_has_native_bf16()
    clf = Classifier(meta=meta, module=module, device=dev, path=path, cpu_bf16=bf16)
    probs = clf.predict(probe_input(meta))
    if tuple(probs.shape) != (2, len(meta.classes)) or not torch.isfinite(probs).all():
        raise ArtifactError(f"{path}: probe forward pass gave {tuple(probs.shape)} / non-finite output")
    log.info(
        "loaded model %s (%s) in %.0f ms", meta.dirname, meta.arch, (time.perf_counter() - started) * 1e3
    )
    return clf


def label_for(probs: torch.Tensor, classes: list[str], threshold: float) -> list[str]:
    """Top class per row, or ``uncertain`` when its probability is below ``threshold``."""
    if probs.shape[0] == 0:
        return []
    top, idx = probs.max(dim=1)
    return [
        classes[i] if p >= threshold else UNCERTAIN for p, i in zip(top.tolist(), idx.tolist(), strict=True)
    ]
