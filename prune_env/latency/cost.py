"""The analytic latency model: predicted milliseconds of any pruning, from a table, without a forward pass.

``predict(keep) = sum over timed layers of table(kept inputs, kept outputs) + residual(keep)``: each timed
layer's kept widths are affine in the units kept per group (the graph's cost model says how), its latency
is interpolated on its measured grid, and the residual (everything not timed alone) is the table's, scaled
with the kept activations (see :mod:`prune_env.latency.table`). At full width this is the measured whole-model latency by
construction. Many keep vectors (rows) are predicted in one vectorised call.

:func:`latency_model` is the entry point beside ``graph.macs``: it builds the graph, then loads the table
from the cache or measures it, and returns a :class:`LatencyModel`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidSettingError, LatencyTableError
from prune_env.graph import DependencyGraph, build_graph
from prune_env.latency.build import build_table, table_meta
from prune_env.latency.cache import cached_table
from prune_env.latency.measure import Timing, measure_module
from prune_env.latency.settings import LatencySettings
from prune_env.latency.table import LatencyTable, model_hash


class LatencyModel:
    """Predicted latency (ms) of ``graph``'s model pruned to any kept-units-per-group vector.

    Args:
        graph: the dependency graph of the model the table was measured for.
        table: its latency table (:func:`prune_env.latency.build_table` or the cache).

    Raises:
        LatencyTableError: the table was measured for another model structure, or its layers do not match
            the graph's MACs terms.
    """

    def __init__(self, graph: DependencyGraph, table: LatencyTable) -> None:
        costs = graph.costs
        if model_hash(graph.model, table.meta.input_shape) != table.meta.model_hash:
            raise LatencyTableError(
                f"the latency table was measured for another model ({table.meta.model or 'unnamed'}) than the "
                f"graph's {type(graph.model).__name__}; measure a table for this model"
            )
        labels = costs.macs_labels
        full = costs.kept(costs.full_keep())
        for layer in table.layers:
            fits = 0 <= layer.term < len(labels) and labels[layer.term] == layer.label
            for slot, widths in ((layer.in_slot, layer.in_widths), (layer.out_slot, layer.out_widths)):
                fits = fits and (slot is None or (slot < len(costs.fixed) and int(full[slot]) == widths[-1]))
            if not fits:
                raise LatencyTableError(
                    f"the latency table's layer {layer.label!r} (MACs term {layer.term}) does not match the graph; "
                    "measure a table for this model"
                )
        self.graph = graph
        self.table = table
        self.full_keep = costs.full_keep()
        self._mult_t = np.asarray(costs.mult, dtype=np.float64).T  # (groups, slots)
        self._fixed = np.asarray(costs.fixed, dtype=np.float64)
        self.full_ms = float(self.predict(self.full_keep))

    def __repr__(self) -> str:
        m = self.table.meta
        return (
            f"LatencyModel({m.model or type(self.graph.model).__name__}: {self.full_ms:.3f} ms at batch {m.batch} "
            f"on {m.device_name}, {m.threads} thread(s); {len(self.table.layers)} timed layers)"
        )

    def _keeps(self, keep: Any) -> np.ndarray:
        keeps = np.asarray(keep)
        if keeps.dtype.kind not in "iu" and not (
            keeps.dtype.kind == "f" and np.all(keeps == np.round(keeps))
        ):
            raise InvalidSettingError(
                f"keep must hold whole numbers of units kept per group, got {keep!r:.80}; convert ratios with "
                "graph.keep_counts(ratios)"
            )
        n = len(self.full_keep)
        if keeps.ndim not in (1, 2) or keeps.shape[-1] != n:
            raise InvalidSettingError(
                f"keep must have {n} entries per row (one per group), got shape {keeps.shape}"
            )
        if np.any(keeps < 1) or np.any(keeps > self.full_keep):
            raise InvalidSettingError(
                f"keep must lie between 1 and each group's units {self.full_keep.tolist()}, got {keeps.tolist()!r:.80}"
            )
        return np.atleast_2d(keeps.astype(np.float64))

    def _kept(self, keep: Any) -> np.ndarray:
        return self._keeps(keep) @ self._mult_t + self._fixed  # kept indices per slot, per row

    def layer_ms(self, keep: Any) -> np.ndarray:
        """Predicted ms of each timed layer (columns, in ``table.layers`` order) for each keep row."""
        return self.table.layer_ms(*self.table.layer_widths(self._kept(keep)))

    def predict(self, keep: Any) -> Any:
        """Predicted ms for ``keep`` (units kept per group): a float for one vector, an array for rows."""
        total = self.table.predict_kept(self._kept(keep))
        return float(total[0]) if np.ndim(keep) == 1 else total

    def ratio(self, keep: Any) -> Any:
        """Predicted latency as a fraction of the unpruned model's (a float, or an array for rows)."""
        return self.predict(keep) / self.full_ms

    def predict_ratios(self, ratios: Any, round_to: int = 1) -> float:
        """Predicted ms of the model pruned at ``ratios`` (as ``graph.macs(ratios)`` takes them)."""
        return float(self.predict(self.graph.keep_counts(ratios, round_to)))


def latency_model(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    settings: LatencySettings | None = None,
    *,
    batch: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    graph: DependencyGraph | None = None,
    architecture: str | None = None,
    cache: bool = True,
    cache_root: str | os.PathLike[str] | None = None,
    refresh: bool = False,
) -> LatencyModel:
    """The latency model of ``model`` on ``example_inputs``: its table from the cache, or measured now.

    Args:
        model: the unpruned model.
        example_inputs: an input it accepts (its first sample is repeated to the batch).
        settings: the measurement protocol (default :class:`LatencySettings`); ``batch``, ``threads`` and
            ``device``, when given, replace its fields.
        graph: the model's dependency graph, if already built.
        architecture: a name for the table's metadata and file name.
        cache: look the table up in (and save it to) the cache directory; False measures and keeps nothing.
        cache_root: the cache directory (default :func:`prune_env.cache.cache_dir`).
        refresh: measure anew even when a table is cached.

    Raises:
        InvalidSettingError: a bad batch, thread count, device or protocol setting.
        LatencyTableError: the cached table was measured for other settings (edited or copied there).
    """
    base = settings or LatencySettings()
    settings = dataclasses.replace(  # re-checked by __post_init__
        base,
        batch=base.batch if batch is None else batch,
        threads=base.threads if threads is None else threads,
        device=base.device if device is None else device,
    )
    graph = graph if graph is not None else build_graph(model, example_inputs)

    def measure() -> LatencyTable:
        return build_table(model, graph, example_inputs, settings, architecture)

    if cache:
        table, _, _ = cached_table(
            table_meta(model, example_inputs, settings, architecture), measure, cache_root, refresh=refresh
        )
    else:
        table = measure()
    return LatencyModel(graph, table)


def measure_pruned(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], settings: LatencySettings
) -> Timing:
    """The measured latency of a (pruned) model by the protocol its table was measured with: to check a
    prediction. ``example_inputs``' first sample is repeated to ``settings.batch``."""
    if not isinstance(model, nn.Module):
        raise InvalidSettingError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return measure_module(model, example_inputs, settings)


__all__ = ["LatencyModel", "latency_model", "measure_pruned"]
