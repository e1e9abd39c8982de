"""Metrics and the training report: accuracy overall / per class / per group / per age band, calibration
(ECE and a reliability diagram), confusion matrix and learning curves, as JSON and PNG plots."""

from __future__ import annotations

import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

ECE_BINS = 15


def ece(
    probs: npt.NDArray[np.floating[Any]], labels: npt.NDArray[np.integer[Any]], bins: int = ECE_BINS
) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    if len(labels) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return float(total)


def reliability(
    probs: npt.NDArray[np.floating[Any]], labels: npt.NDArray[np.integer[Any]], bins: int = ECE_BINS
) -> list[dict[str, float]]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "n": int(sel.sum()),
                    "confidence": float(conf[sel].mean()),
                    "accuracy": float(correct[sel].mean()),
                }
            )
    return out


_LEADING_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)")


def natural_key(label: str) -> tuple[float, str]:
    """Sort key that puts labels starting with a number in numeric order ("0-2", "3-9", "10-19", "70+")
    and the others after them, alphabetically (group names)."""
    m = _LEADING_NUMBER.match(label)
    return (float(m.group(1)), label) if m else (math.inf, label)


def breakdown(correct: Sequence[bool], keys: Sequence[str | None]) -> dict[str, dict[str, float | int]]:
    """{key: {n, accuracy}} for every non-None key, keys in :func:`natural_key` order."""
    acc: dict[str, list[bool]] = defaultdict(list)
    for c, k in zip(correct, keys, strict=True):
        if k is not None:
            acc[k].append(bool(c))
    return {k: {"n": len(acc[k]), "accuracy": float(np.mean(acc[k]))} for k in sorted(acc, key=natural_key)}


def classification_report(
    probs: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.integer[Any]],
    classes: list[str],
    groups: Sequence[str | None],
    ages: Sequence[str | None],
) -> dict[str, Any]:
    pred = probs.argmax(axis=1)
    correct = (pred == labels).tolist()
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(labels.tolist(), pred.tolist(), strict=True):
        cm[t, p] += 1
    return {
        "n": len(labels),
        "accuracy": float(np.mean(correct)) if correct else 0.0,
        "per_class": breakdown(correct, [classes[t] for t in labels.tolist()]),
        "per_group": breakdown(correct, list(groups)),
        "per_age": breakdown(correct, list(ages)),
        "ece": ece(probs, labels),
        "nll": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())
        if len(labels)
        else 0.0,
        "confusion_matrix": {"classes": classes, "rows_true_cols_pred": cm.tolist()},
        "reliability": reliability(probs, labels),
    }


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plots(report: dict[str, Any], history: list[dict[str, float]]) -> dict[str, bytes]:
    """PNG files (name -> bytes): reliability diagram, confusion matrix, learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    rel = report["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if rel:
        ax.bar(
            [(r["lo"] + r["hi"]) / 2 for r in rel],
            [r["accuracy"] for r in rel],
            width=[(r["hi"] - r["lo"]) * 0.9 for r in rel],
            alpha=0.7,
            label="accuracy",
        )
        ax.plot(
            [r["confidence"] for r in rel], [r["accuracy"] for r in rel], "o-", color="C1", label="mean conf."
        )
    ax.set(
        xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {report['ece']:.3f})", xlim=(0, 1)
    )
    ax.legend(loc="upper left")
    out["reliability.png"] = _png(fig)

    cm = np.array(report["confusion_matrix"]["rows_true_cols_pred"])
    classes = report["confusion_matrix"]["classes"]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(classes)
    ax.set_yticklabels(classes)
    ax.set_title("Confusion matrix (test split)")
    out["confusion_matrix.png"] = _png(fig)

    if history:
        epochs = [h["epoch"] for h in history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        a1.plot(epochs, [h["train_loss"] for h in history], label="train")
        a1.plot(epochs, [h["val_loss"] for h in history], label="validation")
        a1.set(xlabel="epoch", ylabel="loss", title="Loss")
        a1.legend()
        a2.plot(epochs, [h["train_acc"] for h in history], label="train")
        a2.plot(epochs, [h["val_acc"] for h in history], label="validation")
        a2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
        a2.legend()
        out["learning_curves.png"] = _png(fig)
    return out


def to_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False).encode()
