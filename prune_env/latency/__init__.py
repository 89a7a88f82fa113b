"""Latency instead of MACs: measured per-layer latency tables and an analytic latency model.

Modules, one job each:

- :mod:`~prune_env.latency.settings` -- the measurement settings (:class:`LatencySettings`), checked;
- :mod:`~prune_env.latency.measure` -- the timing protocol (:func:`measure_callable`, :func:`estimate_noise`);
- :mod:`~prune_env.latency.grid` -- the widths measured per axis and bilinear interpolation;
- :mod:`~prune_env.latency.layers` -- which MACs terms are layers timed alone, rebuilt at other widths;
- :mod:`~prune_env.latency.table` -- the table as a value and its compatibility check;
- :mod:`~prune_env.latency.codec` -- its JSON form, read strictly;
- :mod:`~prune_env.latency.build` -- measuring a table;
- :mod:`~prune_env.latency.cache` -- tables on disk, keyed by model, input, batch, device, threads, torch;
- :mod:`~prune_env.latency.cost` -- :class:`LatencyModel` (``predict(keep)``, ``ratio(keep)``) and
  :func:`latency_model`, the entry point beside ``graph.macs``;
- :mod:`~prune_env.latency.budget` -- a latency as a budget's cost, and a prediction checked by measurement;
- :mod:`~prune_env.latency.guard` -- a chosen policy held to its target by measurement (:func:`fit_to_measurement`).

Example::

    from prune_env import build_graph
    from prune_env.latency import latency_model

    lat = latency_model(model, x, batch=1, threads=1, device="cpu")
    lat.predict(lat.graph.keep_counts(0.5))  # ms, no forward pass
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prune_env.lazy import lazy_exports

# Names resolved on first use, so that importing the package (or its settings, for the command line's
# options) does not import torch.
_EXPORTS = {
    "LatencyTableError": "prune_env.errors",
    **dict.fromkeys(("build_table", "table_meta"), "prune_env.latency.build"),
    **dict.fromkeys(
        ("cached_table", "load_table", "read_table", "save_table", "table_path"), "prune_env.latency.cache"
    ),
    **dict.fromkeys(("LatencyModel", "latency_model", "measure_pruned"), "prune_env.latency.cost"),
    **dict.fromkeys(
        ("NoiseEstimate", "Timing", "estimate_noise", "measure_callable", "measure_module"),
        "prune_env.latency.measure",
    ),
    "LatencySettings": "prune_env.latency.settings",
    **dict.fromkeys(("LatencyFit", "fit_to_measurement"), "prune_env.latency.guard"),
    **dict.fromkeys(("LatencyTable", "LayerTable", "TableMeta"), "prune_env.latency.table"),
}

if TYPE_CHECKING:
    from prune_env.errors import LatencyTableError
    from prune_env.latency.build import build_table, table_meta
    from prune_env.latency.cache import cached_table, load_table, read_table, save_table, table_path
    from prune_env.latency.cost import LatencyModel, latency_model, measure_pruned
    from prune_env.latency.guard import LatencyFit, fit_to_measurement
    from prune_env.latency.measure import (
        NoiseEstimate,
        Timing,
        estimate_noise,
        measure_callable,
        measure_module,
    )
    from prune_env.latency.settings import LatencySettings
    from prune_env.latency.table import LatencyTable, LayerTable, TableMeta


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "LatencyFit",
    "LatencyModel",
    "LatencySettings",
    "LatencyTable",
    "LatencyTableError",
    "LayerTable",
    "NoiseEstimate",
    "TableMeta",
    "Timing",
    "build_table",
    "cached_table",
    "estimate_noise",
    "fit_to_measurement",
    "latency_model",
    "load_table",
    "measure_callable",
    "measure_module",
    "measure_pruned",
    "read_table",
    "save_table",
    "table_meta",
    "table_path",
]
