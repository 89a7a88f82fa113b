"""Drawing helpers of the benchmark's plots: one colour per agent, figures outside pyplot, the Pareto front
and a search's incumbent accuracy."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prune_env.fileio import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

UNIFORM = "uniform"  # the reference agent, drawn in black


def agent_colors(agents: Sequence[str]) -> dict[str, str]:
    """The same colour for an agent in every plot; uniform, the reference, in black."""
    others = [a for a in agents if a != UNIFORM]
    return {UNIFORM: "k", **{a: f"C{i % 10}" for i, a in enumerate(others)}}


def new_figure(n: int) -> tuple[Figure, list[Axes]]:
    # A bare Figure, not pyplot: nothing accumulates in pyplot's global state when plotting in loops or
    # tests, and Jupyter still renders a returned Figure inline.
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.5 * cols, 4.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def finish_figure(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image = io.BytesIO()  # the format the suffix names (.png, .pdf, .svg), as savefig(path) picks it
        fig.savefig(image, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
        write_bytes_atomic(path, image.getvalue())
    return fig


def pareto_front(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Points not dominated by a cheaper-or-equal, at-least-as-accurate point, sorted by cost: ``(n, 2)``."""
    order = np.lexsort((-np.asarray(accuracy), np.asarray(cost)))  # by cost, best accuracy first on ties
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append((cost[i], accuracy[i]))
            best = accuracy[i]
    return np.array(front, dtype=np.float64).reshape(-1, 2)


def incumbent_accuracy(history: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """After each evaluation, the accuracy of the best-reward policy so far (the search's current answer).

    With the accuracy reward this is the running maximum of accuracy; with another reward it is what the
    search would report, which need not be the most accurate policy it saw.
    """
    out, best_reward, acc = [], -math.inf, math.nan
    for e in history:
        if e["reward"] > best_reward:
            best_reward, acc = e["reward"], e["accuracy"]
        out.append(acc)
    return np.array(out, dtype=np.float64)
