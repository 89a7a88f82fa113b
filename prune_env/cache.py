"""The on-disk cache of trained weights: base models and trained proxies (supernets, PruningNets).

Entries are single ``torch.save`` files written atomically and read back with ``weights_only=True`` (no
code runs on load). Each records the key it was made for — a hash of everything that determines the
weights — and a checksum of its tensors, so a stale, foreign or damaged file is ignored (with a warning)
and the weights are trained again, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prune_env.batches import take
from prune_env.data import Splits
from prune_env.fileio import write_atomic

CACHE_ENV = "PRUNE_ENV_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$PRUNE_ENV_CACHE``, else ``~/.cache/prune_env``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prune_env"


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def array_digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 over a list of integer arrays (channel rankings, kept counts)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(f"{a.shape}|".encode() + a.tobytes())
    return h.hexdigest()


def dataset_fingerprint(splits: Splits, *, test: bool = True) -> dict[str, Any]:
    """What identifies the data: name, split seed, sizes, and a hash of a few validation samples.

    ``test=False`` leaves the test split's size out, for what is made without touching it (proxies)."""
    n_val = len(splits.val)  # type: ignore[arg-type]
    x, y = take(splits.val, range(min(8, n_val)))
    h = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    sizes = [len(splits.train), n_val]  # type: ignore[arg-type]
    if test:
        sizes.append(len(splits.test))  # type: ignore[arg-type]
    return {
        "name": splits.name,
        "seed": splits.seed,
        "sizes": sizes,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "val_sample_hash": h,
    }


def cache_key(payload: Mapping[str, Any]) -> str:
    """The key of a cache entry: SHA-256 of ``payload`` as canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_entry(path: Path, key: str, fmt: int) -> dict[str, Any] | None:
    """The entry at ``path`` if it is complete, intact, of format ``fmt`` and made for ``key``; otherwise
    ``None`` (with a warning when a file was there but unusable)."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or entry.get("format") != fmt or entry.get("key") != key:
            raise ValueError("not a checkpoint for this configuration")
        if state_digest(entry["state_dict"]) != entry["checksum"]:
            raise ValueError("checksum mismatch")
        entry["metrics"] = dict(entry.get("metrics", {}))
        return entry
    except Exception as exc:  # any failure to read means "not usable": retrain rather than crash
        warnings.warn(
            f"ignoring unusable cached checkpoint {path} ({type(exc).__name__}: {exc}); retraining",
            stacklevel=3,
        )
        return None


def save_entry(path: Path, key: str, fmt: int, state: Mapping[str, torch.Tensor], **extra: Any) -> None:
    """Write an entry atomically: a reader sees the old file or the complete new one, never a part."""
    state = {k: v.detach().cpu() for k, v in state.items()}
    entry = {"format": fmt, "key": key, "state_dict": state, "checksum": state_digest(state), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(entry, f), binary=True)


__all__ = [
    "CACHE_ENV",
    "array_digest",
    "cache_dir",
    "cache_key",
    "dataset_fingerprint",
    "load_entry",
    "save_entry",
    "state_digest",
]
