"""``prune-env latency MODEL``: measure (or load from the cache) a model's latency table, print it compactly
and write the table's JSON and a plot of predicted latency against MACs per group into ``--out``.

Imported by the command line only when the command runs, so its start-up does not load torch.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prune_env.app.outputs import check_directory_output, owning, publish_directory, staging_directory
from prune_env.fileio import write_text_atomic

if TYPE_CHECKING:
    from prune_env.latency import LatencyModel, LatencySettings

TABLE_FILE = "latency.json"
PLOT_FILE = "latency.png"
# What --out may hold for --force to replace it: an earlier latency output and nothing else.
OUTPUT_FILES = frozenset({TABLE_FILE, PLOT_FILE})
# Kept fractions printed per group.
PRINTED_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def default_out(model: str) -> Path:
    """``latency-MODEL`` in the working directory (a torchvision ``tv:NAME`` becomes ``latency-tv-NAME``)."""
    return Path("latency-" + (re.sub(r"[^A-Za-z0-9_.@-]+", "-", model).strip("-") or "model"))


def check_latency_output(given: str | Path, *, force: bool) -> Path:
    """``--out``: checked as ``apply``'s is, with an earlier latency output the only thing ``force`` replaces."""
    return check_directory_output(given, "--out", force=force, replaceable=OUTPUT_FILES, what="latency table")


def _settings(args: argparse.Namespace) -> LatencySettings:
    from prune_env.app.settings import settings_from_options
    from prune_env.latency.settings import LatencySettings

    return settings_from_options(args, LatencySettings)


def _group_rows(
    lat: LatencyModel, fractions: Sequence[float]
) -> list[tuple[str, int, list[tuple[int, float, float, float]]]]:
    """Per group (the others whole): ``(kept width, predicted ms, latency ratio, MACs ratio)`` at ``fractions``."""
    costs = lat.graph.costs
    rows = []
    for g, group in enumerate(lat.graph.groups):
        widths = sorted({max(1, round(group.units * f)) for f in fractions}, reverse=True)
        keeps = np.tile(lat.full_keep, (len(widths), 1))
        keeps[:, g] = widths
        ms = lat.predict(keeps)
        macs = costs.macs_batch(keeps) / lat.graph.base_macs
        rows.append(
            (
                group.name,
                group.units,
                [
                    (w, float(t), float(t) / lat.full_ms, float(c))
                    for w, t, c in zip(widths, ms, macs, strict=True)
                ],
            )
        )
    return rows


def plot(lat: LatencyModel, path: Path) -> None:
    """Predicted latency ratio and MACs ratio against the kept fraction, one panel per group (the others
    whole) and one for all groups pruned uniformly."""
    import math

    from matplotlib.figure import Figure

    from prune_env.app.plots import finish_figure

    graph = lat.graph
    panels = [(g.name, g.units, i) for i, g in enumerate(graph.groups)] + [("uniform (every group)", 0, -1)]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fractions = np.linspace(0.05, 1.0, 20)
    for ax, (name, units, g) in zip(axes, panels, strict=False):
        if g >= 0:
            widths = np.unique(np.clip(np.round(units * fractions), 1, units)).astype(np.int64)
            keeps = np.tile(lat.full_keep, (len(widths), 1))
            keeps[:, g] = widths
            x = widths / units
        else:
            keeps = np.array([graph.keep_counts(1.0 - f) for f in fractions])
            x = fractions
        ax.plot(x, lat.ratio(keeps), "C0-", label="latency (predicted)")
        ax.plot(x, graph.costs.macs_batch(keeps) / graph.base_macs, "C1--", label="MACs")
        ax.set_title(name if len(name) <= 32 else name[:31] + "…", fontsize=8)
        ax.set_xlabel("kept fraction", fontsize=7)
        ax.set_ylabel("fraction of unpruned", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    m = lat.table.meta
    fig.suptitle(
        f"{m.model or 'model'}: batch {m.batch}, {m.device_name}, {m.threads} thread(s)", fontsize=10
    )
    finish_figure(fig, path)


def run_latency(args: argparse.Namespace) -> int:
    """Measure or load the table, print it, write the JSON and the plot into ``--out``."""
    from prune_env.data import check_dataset_name, load
    from prune_env.graph import build_graph
    from prune_env.latency import latency_model
    from prune_env.latency.codec import table_to_json
    from prune_env.models import check_model_name, get_model

    settings = _settings(args)  # every option checked before anything is loaded or measured
    check_model_name(args.model)
    check_dataset_name(args.dataset)
    out = check_latency_output(
        args.out if args.out is not None else default_out(args.model), force=args.force
    )
    with (
        owning([(out, "--out")], lambda: check_latency_output(out, force=args.force)) as seen,
        staging_directory(out) as stage,
    ):
        splits = load(args.dataset)
        model = get_model(args.model, splits.num_classes, splits.in_channels).eval()
        x = splits.example_inputs(1)
        graph = build_graph(model, x)
        lat = latency_model(model, x, settings, graph=graph, architecture=args.model, refresh=args.refresh)
        table = lat.table
        m = table.meta
        print(
            f"{args.model} on {args.dataset} inputs {tuple(splits.input_shape)}, batch {m.batch}, {m.device} "
            f"({m.device_name}), {m.threads} thread(s), torch {m.torch}"
        )
        print(
            f"whole model {table.whole.median_ms:.3f} ms measured; {len(table.layers)} timed layers "
            f"{table.layers_full_ms:.3f} ms + residual {table.residual_ms:.3f} ms, of which "
            f"{table.residual_slope_ms:.3f} ms goes with the kept activations; protocol "
            f"noise {100 * table.noise:.1f}%"
        )
        print(f"{'group':<28} {'units':>5}  kept: ms (latency ratio / MACs ratio)")
        for name, units, cells in _group_rows(lat, PRINTED_FRACTIONS):
            text = "  ".join(f"{w}: {t:.3f} ({r:.2f}/{c:.2f})" for w, t, r, c in cells)
            print(f"{name[:28]:<28} {units:>5}  {text}")
        if table.noisy_points:
            print(
                f"warning: {table.noisy_points} measurement(s) stayed noisier than the protocol allows (IQR > "
                f"{100 * settings.noise_bound:.0f}% of the median): the machine was busy; measure again with "
                "--refresh on a quiet machine"
            )
        write_text_atomic(stage / TABLE_FILE, table_to_json(table))
        plot(lat, stage / PLOT_FILE)
        publish_directory(stage, out, force=args.force, option="--out", seen=seen[out])
        print(f"wrote {out / TABLE_FILE} and {out / PLOT_FILE}")
    return 0


__all__ = ["check_latency_output", "default_out", "plot", "run_latency"]
