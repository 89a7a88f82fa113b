"""Actions of the environments: values in [-1, 1] mapped affinely to pruning ratios in [0, max_ratio]."""

from __future__ import annotations

import numpy as np

from prune_env.errors import InvalidActionError


def action_to_ratio(action: np.ndarray, max_ratio: float, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Map actions in [-1, 1] affinely to ratios in [0, max_ratio]; values outside are clipped.

    NaN/inf, a wrong shape or a non-real dtype (complex, bool, strings, objects) raise
    :class:`InvalidActionError` naming the problem (never a silent wrong answer).
    """
    raw = np.asarray(action)
    if raw.dtype.kind not in "fiu":  # complex would lose its imaginary part, bools and strings mean nothing
        raise InvalidActionError(f"action must hold real numbers, got dtype {raw.dtype} ({action!r})")
    a = raw.astype(np.float64)
    if a.shape != expected_shape and a.size == int(np.prod(expected_shape)) and a.ndim <= 1:
        a = a.reshape(expected_shape)  # a scalar for a (1,) space, or a flat list
    if a.shape != expected_shape:
        raise InvalidActionError(f"action has shape {a.shape}, expected {expected_shape}")
    if not np.all(np.isfinite(a)):
        raise InvalidActionError(f"action contains non-finite values (NaN or inf): {a[~np.isfinite(a)][:4]}")
    return (np.clip(a, -1.0, 1.0) + 1.0) / 2.0 * max_ratio


def ratio_to_action(ratio: np.ndarray, max_ratio: float) -> np.ndarray:
    """Inverse of :func:`action_to_ratio` (for scripted policies and tests)."""
    return (np.asarray(ratio, dtype=np.float64) / max_ratio * 2.0 - 1.0).astype(np.float32)
