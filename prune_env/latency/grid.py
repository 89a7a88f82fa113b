"""The widths a layer is measured at, and bilinear interpolation between them (pure numpy).

A layer's latency is a function of its (input width, output width). It is measured on a grid per axis:
the smallest width the graph can leave (usually 1), a few small widths, aligned widths (multiples of 8, 16
or 32: vectorised CPU kernels and GPU tensor cores run in such blocks, so latency steps there, HALP's
observation) and the full width. Between grid points latency is interpolated bilinearly, which is exact at
the points and monotone between them whenever the measured values are.
"""

from __future__ import annotations

import numpy as np


def alignment(full: int) -> int:
    """The width multiple measured for an axis of ``full`` channels: coarser for wider layers, so the grid
    covers them with a few points."""
    return 32 if full >= 128 else 16 if full >= 64 else 8


def axis_widths(full: int, low: int = 1, max_points: int = 8, step: int = 1) -> tuple[int, ...]:
    """Sorted widths in ``[low, full]`` to measure an axis at: every width if few, else ``low``, small
    powers of two, aligned multiples (thinned evenly to fit ``max_points``) and ``full``.

    ``step``: every width a multiple of it (a grouped convolution's channels come in whole groups).
    """
    if full < 1 or not 1 <= low <= full or max_points < 2 or step < 1:
        raise ValueError(f"bad axis: full={full}, low={low}, max_points={max_points}, step={step}")
    low = -(-low // step) * step if low % step else low
    low = min(low, full)
    candidates = range(low, full + 1, step) if step > 1 else range(low, full + 1)
    if len(candidates) <= max_points:
        return tuple(candidates)
    align = max(alignment(full), step) // step * step
    budget = max_points - 2  # points besides low and full
    small = [w for w in (2, 4, 8, 16) if low < w < align and w % step == 0]
    keep_small = min(2, budget // 2, len(small))  # at most half the budget: aligned widths matter more
    small = small[len(small) - keep_small :]
    aligned = [w for w in range(align, full, align) if w > low]
    room = budget - len(small)
    if len(aligned) > room:
        # Evenly spaced among the aligned widths, from the widest down (near full is where pruning starts).
        stride = len(aligned) / room if room > 0 else 0.0
        aligned = [aligned[len(aligned) - 1 - int(k * stride)] for k in range(max(room, 0))]
    return tuple(sorted({low, *small, *aligned, full}))


def _locate(axis: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value of ``x`` (clipped to the axis): the index of the grid cell's left point and the fraction of
    the way to its right point. A one-point axis is a constant: cell 0, fraction 0."""
    if len(axis) == 1:
        return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
    x = np.clip(x, axis[0], axis[-1])
    i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
    t = (x - axis[i]) / (axis[i + 1] - axis[i])
    return i, t


def bilinear(
    xs: np.ndarray, ys: np.ndarray, values: np.ndarray, x: np.ndarray | float, y: np.ndarray | float
) -> np.ndarray:
    """``values[i, j]`` measured at ``(xs[i], ys[j])``, interpolated at every ``(x, y)`` (broadcast; values
    outside the grid are clipped to its edge). Exact at grid points."""
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).reshape(len(xs), len(ys))
    x_arr, y_arr = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    i, tx = _locate(xs, x_arr)
    j, ty = _locate(ys, y_arr)
    i1 = np.minimum(i + 1, len(xs) - 1)
    j1 = np.minimum(j + 1, len(ys) - 1)
    return (
        v[i, j] * (1 - tx) * (1 - ty)
        + v[i1, j] * tx * (1 - ty)
        + v[i, j1] * (1 - tx) * ty
        + v[i1, j1] * tx * ty
    )


__all__ = ["alignment", "axis_widths", "bilinear"]
