"""Where tensors go: CUDA when the machine has it, else the CPU."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The device used when a caller does not name one: the first CUDA GPU if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means :func:`default_device`; anything else is passed to :class:`torch.device`."""
    return default_device() if device is None else torch.device(device)
