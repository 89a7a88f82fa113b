"""Where tensors go: CUDA when the machine has it, else the CPU."""

from __future__ import annotations

import itertools

import torch


def default_device() -> torch.device:
    """The device used when a caller does not name one: the first CUDA GPU if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means :func:`default_device`; anything else is passed to :class:`torch.device`."""
    return default_device() if device is None else torch.device(device)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the RNGs that work on ``device`` uses: the CPU generator, and the GPU's when it is CUDA.

    ``torch.manual_seed`` also queues a lazy seed for every CUDA device, and on a CUDA build of torch
    without a GPU initialised it records a stack trace for that each call: ~0.5 ms, as much as a
    small proxy evaluation's bookkeeping. Results on ``device`` are the same.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def on_device(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` lives on ``device``, judged by its first parameter or buffer (a model with no
    tensors is anywhere). Cheap enough for a hot path; a model split across devices is not supported."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first is None or first.device == device
