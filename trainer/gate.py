"""The promotion gate's like-with-like measurement: the current model run on the new training run's own
validation images, through its own preprocessing contract, so the two models are judged on the same
images (another architecture or input size is fine). The decision itself, and the flags and limits that
``genderlens train`` and ``genderlens models promote`` share, are ``shared.models.promotion``.

No current model, or one that does not load (workers would not be serving it), gives a baseline with
nothing to beat; one with other classes gives its *recorded* validation figures, labelled as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.models.promotion import NO_BASELINE, SAME_SPLIT, Baseline, recorded_baseline

if TYPE_CHECKING:
    from shared.detectors import FaceDetector
    from shared.models.artifact import ModelMeta
    from trainer.data import Sample


def _provenance(meta: ModelMeta, fingerprint: str, split: dict[str, Any]) -> str:
    """Whether the current model could have trained on these validation images."""
    old = meta.training.get("config", {}) if isinstance(meta.training, dict) else {}
    same_split = all(old.get(k) == v for k, v in split.items())
    if meta.data_fingerprint == fingerprint and same_split:
        return "it was trained on the same data and split, so it never saw them in training"
    return (
        "it was trained on other data or another split, so it may have seen some of them in training, "
        "which flatters it"
    )


def contract(input_size: int, margin: float, template: str) -> tuple[int, float, str]:
    """What a crop depends on besides the photo and the detector (the artifact's preprocessing
    contract: chip size, framing margin, alignment template). Two models with the same contract see
    the same crops."""
    return (int(input_size), round(float(margin), 6), template)


def baseline_on_split(
    models_dir: Path,
    classes: Sequence[str],
    samples: Sequence[Sample],
    root: Path,
    detector: FaceDetector,
    cache_dir: Path,
    no_face: str,
    device: Any,
    fingerprint: str,
    split: dict[str, Any],
    own_crops: tuple[tuple[int, float, str], Any] | None = None,
) -> Baseline:
    """Run the current model of ``models_dir`` on the new run's validation ``samples``.

    The crops are made with the current artifact's own contract through the crop cache (same detector,
    same face choice, same no-face policy as the new run), unless it equals the new run's contract
    (``own_crops`` = (contract, uint8 crops [N,3,S,S] of ``samples``)), in which case they are the same
    pixels and are reused. Falls back to the recorded metrics when the classes differ.
    """
    import numpy as np
    import torch

    from shared.models.artifact import ArtifactError, current_dir, load_artifact, read_meta
    from trainer.cache import STATUS_OK, build_or_load
    from trainer.data import Catalog
    from trainer.report import classification_report

    try:
        target = current_dir(models_dir)
    except ArtifactError as exc:
        return Baseline(NO_BASELINE, None, None, None, f"the current pointer is unusable ({exc})")
    if target is None or not target.is_dir():
        return Baseline(NO_BASELINE, None, None, None, "there is no current model: nothing to compare with")
    try:
        clf = load_artifact(target, device)
    except ArtifactError as exc:
        return Baseline(
            NO_BASELINE, target.name, None, None, f"the current model does not load ({exc}): nothing to beat"
        )
    meta = clf.meta
    if sorted(meta.classes) != sorted(classes):
        return recorded_baseline(
            target, read_meta(target), f"the current model has other classes ({', '.join(meta.classes)})"
        )
    mine = contract(meta.input_size, meta.margin, meta.template)
    if own_crops is not None and own_crops[0] == mine:
        crops = torch.as_tensor(own_crops[1])
        usable = np.ones(len(samples), dtype=bool)
    else:
        cache = build_or_load(
            Catalog(list(samples), list(classes), root),
            cache_dir,
            detector,
            mine[0],
            mine[1],
            no_face,
            template=mine[2],
        )
        crops = torch.from_numpy(cache.crops)
        usable = cache.status == STATUS_OK if no_face == "skip" else np.ones(len(samples), dtype=bool)
    order = [meta.classes.index(c) for c in classes]  # the current model's columns in our class order
    probs = torch.zeros((len(samples), len(classes)))
    idx = np.nonzero(usable)[0]
    for start in range(0, len(idx), 256):
        sel = torch.from_numpy(idx[start : start + 256])
        probs[sel] = clf.predict(crops[sel].contiguous()).float().cpu()[:, order]
    labels = np.array([list(classes).index(s.label) for s in samples], dtype=np.int64)
    # A sample whose face the current contract did not find (cannot happen with one detector, which
    # found it for the new run) counts as wrong.
    for i in np.nonzero(~usable)[0].tolist():
        probs[i, (labels[i] + 1) % len(classes)] = 1.0
    report = classification_report(
        probs.numpy(), labels, list(classes), [s.group for s in samples], [s.age for s in samples]
    )
    note = f"both run on these {len(samples)} images; {_provenance(meta, fingerprint, split)}"
    return Baseline(SAME_SPLIT, target.name, float(report["accuracy"]), report, note)
