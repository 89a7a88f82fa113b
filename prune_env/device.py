"""Where tensors go: CUDA when the machine has it, else the CPU."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from prune_env.errors import InvalidSettingError


def default_device() -> torch.device:
    """The device used when a caller does not name one: the first CUDA GPU if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """The devices this machine can run on, as ``--device`` accepts them: ``cpu``, then ``cuda`` and
    ``cuda:0`` ... ``cuda:N-1`` for its GPUs, and ``mps`` on Apple silicon."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: ``None`` means :func:`default_device`; anything else must name a device this
    machine has, else :class:`InvalidSettingError` saying which devices exist.

    Every entry point (the CLI, the problem, the proxy, training) goes through here, so a bad device is
    refused up front in one line instead of failing deep inside the first ``.to(device)`` -- or, for a GPU
    index past the last one, on the first kernel launch.
    """
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and device.strip():
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError):  # torch's parser raises RuntimeError for an unknown type
            raise InvalidSettingError(
                f"unknown device {device!r}; available devices: {', '.join(available_devices())}"
            ) from None
    else:
        raise InvalidSettingError(
            f"device must be a name such as 'cpu' or 'cuda:0', got {device!r}; "
            f"available devices: {', '.join(available_devices())}"
        )
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSettingError(
                f"{device} requested but torch.cuda.is_available() is False (no usable GPU or a CPU-only "
                "build of torch); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidSettingError(
                f"{device} requested but this machine has {count} GPU{'s' if count != 1 else ''} "
                f"(cuda:0 to cuda:{count - 1}); available devices: {', '.join(available_devices())}"
            )
        return dev
    if dev.type == "mps" and str(dev) in available_devices():
        return dev
    raise InvalidSettingError(
        f"device {device!r} is not available here; available devices: {', '.join(available_devices())}"
    )


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


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists and dicts: a detector's images and
    targets) on ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def on_device(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` lives on ``device``, judged by its first parameter or buffer (a model with no
    tensors is anywhere). Cheap enough for a hot path; a model split across devices is not supported."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first is None or first.device == device
