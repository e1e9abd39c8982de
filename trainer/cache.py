"""The aligned-crop cache: every training image goes once through the serving pipeline (detect -> pick the
central face -> ``shared.preprocess.crop_faces_bgr``) and the uint8 crops are kept on disk, so training
reads memory, never JPEGs, and a second run with the same data and settings starts in about a second.

The cache key covers the file list (path, size, mtime), the crop size and margin, the preprocessing
version and the detector settings; any change builds a new cache. Files are written to a temp name and
renamed, so a killed build never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from shared.detectors import FaceDetector
from shared.detectors.fallback import fallback_stats
from shared.fsutil import atomic_write
from shared.preprocess import DEFAULT_TEMPLATE, PREPROCESS_VERSION, crop_faces_bgr
from trainer.data import Catalog, FaceImageDataset
from trainer.faces import central_face

log = logging.getLogger(__name__)

CACHE_FORMAT: Final = 2
#: What happens to an image where the detector finds no face.
NO_FACE_POLICIES: Final = ("skip", "resize")
STATUS_OK: Final = 0
STATUS_NO_FACE: Final = 1
STATUS_UNREADABLE: Final = 2


@dataclass
class CropCache:
    """crops: uint8 [N, 3, S, S] RGB; status: int8 [N] per catalog sample (ok / no face / unreadable);
    ``fingerprint``: sha256 over the files' bytes and labels (the artifact's data fingerprint)."""

    crops: npt.NDArray[np.uint8]
    status: npt.NDArray[np.int8]
    fingerprint: str
    path: Path

    @property
    def usable(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.status == STATUS_OK)


def cache_key(
    catalog: Catalog,
    size: int,
    margin: float,
    detector: FaceDetector,
    no_face: str,
    template: str = DEFAULT_TEMPLATE,
) -> str:
    h = hashlib.sha256()
    cfg = getattr(detector, "config", None)
    settings = {
        "format": CACHE_FORMAT,
        "size": size,
        "margin": margin,
        "preprocess": PREPROCESS_VERSION,
        "detector": detector.name,
        "threshold": getattr(cfg, "score_threshold", None),
        "max_side": getattr(cfg, "max_side", None),
        "fallback_sides": list(getattr(cfg, "fallback_sides", ())),
        "no_face": no_face,
    }
    if template != DEFAULT_TEMPLATE:  # keeps the keys of existing caches of the default framing
        settings["template"] = template
    h.update(json.dumps(settings, sort_keys=True).encode())
    for s in catalog.samples:
        st = s.path.stat()
        h.update(f"{s.relpath}\0{s.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def build_or_load(
    catalog: Catalog,
    cache_dir: Path,
    detector: FaceDetector,
    size: int,
    margin: float,
    no_face: str = "skip",
    template: str = DEFAULT_TEMPLATE,
) -> CropCache:
    """Load the cache for this catalog and these settings, or build it (with a progress bar)."""
    if no_face not in NO_FACE_POLICIES:
        raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}")
    key = cache_key(catalog, size, margin, detector, no_face, template)
    folder = cache_dir / f"crops-{key}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        crops = np.load(folder / "crops.npy", mmap_mode=None)
        status = np.load(folder / "status.npy")
        if crops.shape[0] == len(catalog.samples) == status.shape[0]:
            log.info("crop cache hit: %s (%d crops)", folder, crops.shape[0])
            return CropCache(crops, status, meta["fingerprint"], folder)
        log.warning("crop cache %s does not match the catalog; rebuilding", folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(catalog.samples)
    crops = np.zeros((n, 3, size, size), dtype=np.uint8)
    status = np.zeros((n,), dtype=np.int8)
    fp = hashlib.sha256()
    dataset = FaceImageDataset(catalog)  # lazy reads; an unreadable file gives None, never an exception
    for i in tqdm(range(len(dataset)), desc="align crops", unit="img", mininterval=2):
        sample = catalog.samples[i]
        try:
            raw = sample.path.read_bytes()
        except OSError:
            raw = b""
        fp.update(hashlib.sha256(raw).digest() + sample.label.encode())
        image, _, _ = dataset[i]
        if image is None:
            status[i] = STATUS_UNREADABLE
            continue
        dets = detector.detect([image])[0]
        h, w = image.shape[:2]
        pick = central_face(dets, w, h)
        if pick is None:
            status[i] = STATUS_NO_FACE
            if no_face == "resize":
                # The image is taken to be a chip already framed like the template (UTKFace-style).
                import cv2

                small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                crops[i] = small[:, :, ::-1].transpose(2, 0, 1)
            continue
        crop = crop_faces_bgr(image, dets.landmarks[pick : pick + 1], size, margin, template)[0]
        crops[i] = crop.transpose(2, 0, 1)
    atomic_write(folder / "crops.npy", lambda fh: np.save(fh, crops))
    atomic_write(folder / "status.npy", lambda fh: np.save(fh, status))
    fingerprint = "sha256:" + fp.hexdigest()
    meta = {
        "fingerprint": fingerprint,
        "n": n,
        "size": size,
        "margin": margin,
        "no_face": no_face,
        "template": template,
        "counts": {
            "ok": int((status == STATUS_OK).sum()),
            "no_face": int((status == STATUS_NO_FACE).sum()),
            "unreadable": int((status == STATUS_UNREADABLE).sum()),
        },
        "detector_fallback": stats.snapshot() if (stats := fallback_stats(detector)) else None,
    }
    atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    log.info(
        "crop cache built: %s %s; detector fallback %s", folder, meta["counts"], meta["detector_fallback"]
    )
    return CropCache(crops, status, fingerprint, folder)
