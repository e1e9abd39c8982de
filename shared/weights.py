"""Detector weights: pinned download URLs with sha256, or a local folder.

Nothing is downloaded when ``weights_dir`` is given (tests and CI point it at ../shared/weights/yunet);
otherwise a file is fetched once into ``cache_dir`` and checked against its pinned sha256.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared.fsutil import atomic_write

log = logging.getLogger(__name__)

_BASE: Final = (
    "https://raw.githubusercontent.com/ShiqiYu/libfacedetection.train/"
    "0047ac24afb1a50a0c6105001c89d1b5b805dbf1/"
)


@dataclass(frozen=True)
class WeightFile:
    name: str
    url: str
    sha256: str


WEIGHTS: Final = {
    w.name: w
    for w in (
        WeightFile(
            "face_detection_yunet_2023mar.onnx",
            _BASE + "onnx/yunet_s_640_640.onnx",
            "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
        ),
        WeightFile(
            "yunet_s.pth",
            _BASE + "weights/yunet_s.pth",
            "f2688fecd5aef7d204d04ca12ff377b724978abbe5955740bc67280d99ffe4d6",
        ),
        WeightFile(
            "yunet_n.pth",
            _BASE + "weights/yunet_n.pth",
            "9c7c9e14a4d60e57491d77e4d8b0d451bd834f300e05c0dea7fd1f6533817b06",
        ),
    )
}


class WeightsError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(
    name: str, weights_dir: Path | None, cache_dir: Path, download_timeout_s: float = 60.0
) -> Path:
    """Return a verified local path to weight file ``name``."""
    if name not in WEIGHTS:
        raise WeightsError(f"unknown weights file {name!r}; known: {', '.join(sorted(WEIGHTS))}")
    spec = WEIGHTS[name]
    if weights_dir is not None:
        path = Path(weights_dir) / name
        if not path.is_file():
            raise WeightsError(
                f"{path} not found: put {name} in {weights_dir} (GENDERLENS_WEIGHTS_DIR), or unset "
                f"GENDERLENS_WEIGHTS_DIR to download it from {spec.url}"
            )
        _verify(path, spec)
        return path
    path = Path(cache_dir) / name
    if path.is_file():
        _verify(path, spec)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s", name, spec.url)
    try:
        with urllib.request.urlopen(spec.url, timeout=download_timeout_s) as resp:
            data = resp.read()
    except OSError as exc:
        raise WeightsError(
            f"could not download {name} from {spec.url} ({exc}). Offline? Put the file in a folder and "
            f"set GENDERLENS_WEIGHTS_DIR to it (or --weights-dir), or copy it to {path}"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise WeightsError(f"downloaded {name} has sha256 {digest}, expected {spec.sha256}; not used")
    atomic_write(path, data)
    return path


def _verify(path: Path, spec: WeightFile) -> None:
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise WeightsError(f"{path} has sha256 {digest}, expected {spec.sha256} (corrupt or wrong file)")
