"""What policies do differently: each agent's per-group pruning ratios beside the others'.

A table of accuracies says which allocation won, not what it is; this draws the ratios each agent's
policies give every channel group (mean over seeds, the range as a band) and writes the same numbers to a
CSV beside the plot, so a reader can tell "prunes the last layers harder" from "prunes everything alike".
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prune_env.app.results import BenchmarkResults
from prune_env.app.runfiles import save_figure
from prune_env.app.tidy_files import write_csv

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ALLOCATION_FIELDS = ("agent", "group", "runs", "mean_ratio", "min_ratio", "max_ratio")


def allocation_rows(results: BenchmarkResults) -> list[dict[str, float | int | str]]:
    """Per agent and group index: the mean, min and max pruning ratio over the agent's runs."""
    by_agent: dict[str, list[np.ndarray]] = defaultdict(list)
    for row in results.runs:
        ratios = np.array([float(r) for r in str(row["ratios"]).split()], dtype=np.float64)
        by_agent[str(row["agent"])].append(ratios)
    rows: list[dict[str, float | int | str]] = []
    for agent, runs in by_agent.items():
        lengths = {len(r) for r in runs}
        if len(lengths) != 1:
            raise ValueError(f"{agent}'s runs have {sorted(lengths)} groups: they are not one setting's runs")
        stacked = np.stack(runs)
        for group in range(stacked.shape[1]):
            column = stacked[:, group]
            rows.append(
                {
                    "agent": agent,
                    "group": group,
                    "runs": len(column),
                    "mean_ratio": float(column.mean()),
                    "min_ratio": float(column.min()),
                    "max_ratio": float(column.max()),
                }
            )
    return rows


def plot_allocations(results: BenchmarkResults, path: str | os.PathLike[str]) -> Figure:
    """Draw every agent's per-group ratios to ``path`` (PNG) and write them to ``path`` with ``.csv``."""
    from matplotlib.figure import Figure

    rows = allocation_rows(results)
    write_csv(Path(path).with_suffix(".csv"), ALLOCATION_FIELDS, rows)
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for agent in dict.fromkeys(str(r["agent"]) for r in rows):
        mine = [r for r in rows if r["agent"] == agent]
        x = np.array([int(r["group"]) for r in mine])
        mean = np.array([float(r["mean_ratio"]) for r in mine])
        ax.plot(x, mean, marker="o", markersize=3, label=f"{agent} (n={mine[0]['runs']})")
        low = np.array([float(r["min_ratio"]) for r in mine])
        high = np.array([float(r["max_ratio"]) for r in mine])
        ax.fill_between(x, low, high, alpha=0.12)
    ax.set_xlabel("channel group (network order)")
    ax.set_ylabel("pruning ratio (fraction of units removed)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize="small", ncols=2)
    save_figure(fig, Path(path))
    return fig
