"""Which torch device a command runs on: one rule for the inference worker and the trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(choice: str, command: str) -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cpu``; ``cuda`` or
    ``cuda:N`` only when CUDA is available, else exit with ``command``'s name and why (asking for a GPU
    and silently getting the CPU would be a surprise many times slower)."""
    import torch  # here, not at import: the CLI loads torch only for the commands that use it

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{command}: --device {choice} asked for, but no CUDA device is available")
    return torch.device(choice)
