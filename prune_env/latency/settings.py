"""How latency is measured: one frozen dataclass, checked when it is made, and where it runs.

Every value is checked at the boundary (here, when the object is made) with
:mod:`prune_env.validation`'s strict number rules, so a bad batch, thread count, repeat count or device is
refused in one line before any model is traced or timed.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prune_env.errors import InvalidSettingError
from prune_env.validation import as_int, as_real

if TYPE_CHECKING:
    import torch

# Devices whose kernels we know how to time: the CPU (wall clock) and CUDA (events + synchronisation).
TIMED_DEVICE_TYPES = ("cpu", "cuda")


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask, every core counts
        return os.cpu_count() or 1


def _int_in(name: str, value: object, low: int, high: int | None, fix: str) -> int:
    result = as_int(name, value)
    if result < low or (high is not None and result > high):
        bounds = f">= {low}" + ("" if high is None else f" and <= {high}")
        raise InvalidSettingError(f"{name} must be an integer {bounds}, got {value!r}; {fix}")
    return result


@dataclass(frozen=True)
class LatencySettings:
    """How a latency is measured (and what a latency table is measured for).

    Attributes:
        batch: samples per forward pass, the batch the model is deployed with.
        threads: intra-op CPU threads while timing (``torch.set_num_threads``; restored afterwards). At most
            the cores this process may use: more threads than cores time the scheduler, not the model.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; kept as the canonical name (``"cuda"`` -> ``"cuda:0"``).
        warmup: untimed calls before timing (allocator, caches, lazy kernels, oneDNN primitive creation).
        repeats: timed samples; the median is reported, the interquartile range says how noisy it was.
        min_sample_ms: each sample runs the callable enough times to last at least this long, so that a
            20 µs convolution is not timed at the clock's and the scheduler's granularity.
        noise_bound: a measurement whose interquartile range exceeds this fraction of its median is
            disturbed: it is repeated, and flagged ``noisy`` if it still is after ``max_attempts``.
        max_attempts: measurements of one callable before giving up on a quiet one.
        grid_points: at most this many widths per axis of a layer's table.
        progress: a tqdm bar while a table is measured.
    """

    # Each field's help is the command line's (`prune-env latency` has one option per field).
    batch: int = field(default=1, metadata={"help": "samples per forward pass"})
    threads: int = field(default=1, metadata={"help": "CPU threads while timing"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1..."})
    warmup: int = field(default=3, metadata={"help": "untimed calls before timing"})
    repeats: int = field(default=11, metadata={"help": "timed samples per measurement"})
    min_sample_ms: float = field(default=0.5, metadata={"help": "each timed sample lasts at least this long"})
    noise_bound: float = field(
        default=0.25,
        metadata={"help": "a measurement whose IQR exceeds this fraction of its median is repeated"},
    )
    max_attempts: int = field(
        default=3, metadata={"help": "measurements of one call before it is flagged noisy"}
    )
    grid_points: int = field(default=8, metadata={"help": "widths per axis of a layer's table"})
    progress: bool = field(default=True, metadata={"help": "a progress bar while a table is measured"})

    def __post_init__(self) -> None:
        cores = available_cores()
        checked = {
            "batch": _int_in("batch", self.batch, 1, None, "pass the deployment batch size, e.g. batch=1"),
            "threads": _int_in(
                "threads",
                self.threads,
                1,
                cores,
                f"this process may run on {cores} CPU{'s' if cores != 1 else ''}: pass a thread count from 1 to "
                f"{cores}",
            ),
            "warmup": _int_in("warmup", self.warmup, 0, None, "pass e.g. warmup=3"),
            "repeats": _int_in("repeats", self.repeats, 1, None, "pass e.g. repeats=11"),
            "max_attempts": _int_in("max_attempts", self.max_attempts, 1, None, "pass e.g. max_attempts=3"),
            "grid_points": _int_in(
                "grid_points", self.grid_points, 2, None, "pass e.g. grid_points=8 (widths per axis)"
            ),
        }
        min_sample = as_real("min_sample_ms", self.min_sample_ms)
        if min_sample < 0:
            raise InvalidSettingError(
                f"min_sample_ms must be >= 0, got {self.min_sample_ms!r}; pass e.g. 0.5"
            )
        bound = as_real("noise_bound", self.noise_bound)
        if bound <= 0:
            raise InvalidSettingError(f"noise_bound must be > 0, got {self.noise_bound!r}; pass e.g. 0.25")
        if not isinstance(self.progress, bool):
            raise InvalidSettingError(f"progress must be True or False, got {self.progress!r}")
        for name, value in {**checked, "min_sample_ms": min_sample, "noise_bound": bound}.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "device", canonical_device(self.device))

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)


def canonical_device(device: object) -> str:
    """``device`` as a name this machine has and we can time on (``"cuda"`` becomes ``"cuda:0"``), else
    :class:`InvalidSettingError` naming the devices there are."""
    import torch

    from prune_env.device import resolve_device

    if not isinstance(device, (str, torch.device)):
        raise InvalidSettingError(f"device must be a name such as 'cpu' or 'cuda:0', got {device!r}")
    dev = resolve_device(device)  # unknown or absent devices are refused there, naming the ones there are
    if dev.type not in TIMED_DEVICE_TYPES:
        raise InvalidSettingError(
            f"latency is measured on {' or '.join(TIMED_DEVICE_TYPES)} only, got device {device!r}; "
            "pass device='cpu' or a CUDA device"
        )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def device_name(device: str) -> str:
    """What the hardware is called: the GPU's name for CUDA, the CPU model (``/proc/cpuinfo``) otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return str(torch.cuda.get_device_name(dev))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


__all__ = ["LatencySettings", "available_cores", "canonical_device", "device_name"]
