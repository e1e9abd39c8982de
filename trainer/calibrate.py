"""Calibration on the validation split, folded into the model so serving needs nothing extra.

After training: flip averaging when it helps (architectures that can), a class-balance offset (two
classes: equal recall for both on validation), a temperature (the lowest validation NLL), both folded
into the last linear layer, and the ``uncertain`` threshold (the lowest top-class probability above
which validation accuracy reaches 97%).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.runtime import say

log = logging.getLogger("trainer")

#: The validation logits of the model as it is at the time of the call ([N, classes], on the CPU).
Logits = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Calibration:
    bias: float  #: logit offset of class 1 (two classes; else 0)
    temperature: float
    threshold: float  #: below this top-class probability a face is ``uncertain``
    flip_tta: bool  #: the model averages each crop with its mirror image
    val_probs: torch.Tensor  #: the calibrated model's validation probabilities


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


def choose_flip_tta(model: nn.Module, choice: str, val_logits: Logits, labels: torch.Tensor) -> bool:
    """``on``, ``off``, or ``auto``: keep flip averaging if it lowers the validation loss. Leaves the
    model's ``flip_tta`` set to the choice."""
    flip_tta = choice == "on"
    if choice == "auto":
        model.flip_tta = True  # type: ignore[assignment,unused-ignore]
        tta_loss = float(F.cross_entropy(val_logits(), labels))
        model.flip_tta = False  # type: ignore[assignment,unused-ignore]
        plain_loss = float(F.cross_entropy(val_logits(), labels))
        flip_tta = tta_loss < plain_loss
        log.info("flip averaging: val loss %.4f vs %.4f without -> %s", tta_loss, plain_loss, flip_tta)
    model.flip_tta = flip_tta  # type: ignore[assignment,unused-ignore]
    return flip_tta


def calibrate(
    model: nn.Module, val_logits: Logits, labels: torch.Tensor, flip_choice: str | None
) -> Calibration:
    """Calibrate ``model`` in place on the validation split (``val_logits`` of it, ``labels``).
    ``flip_choice`` is None for an architecture without flip averaging."""
    flip_tta = False if flip_choice is None else choose_flip_tta(model, flip_choice, val_logits, labels)
    logits = val_logits()
    bias = balance_bias(logits, labels)
    shift = torch.zeros(logits.shape[1])
    if logits.shape[1] == 2:
        shift[1] = bias
    temperature = fit_temperature(logits + shift, labels)
    fold_calibration(model, shift, temperature)
    val_probs = torch.softmax(val_logits(), dim=1)
    threshold = uncertain_threshold(val_probs, labels)
    say(
        f"calibration: class-balance bias {bias:+.3f}, temperature {temperature:.3f}, "
        f"uncertain below {threshold:.2f}"
    )
    return Calibration(bias, temperature, threshold, flip_tta, val_probs)
