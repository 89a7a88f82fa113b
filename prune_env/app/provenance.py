"""Where a result came from, recorded beside it: the source revision and the hardware it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_revision(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), with ``+dirty`` when the
    checkout has uncommitted changes; ``None`` for an installed package or without git."""
    where = path if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def hardware() -> dict[str, Any]:
    """CPU, core count, torch's thread count and the CUDA devices visible to this process."""
    found: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        found["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return found
