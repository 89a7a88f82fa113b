"""The latency table as a value: per timed layer a grid of measured milliseconds, the whole model's
measured latency, the residual between them, and the metadata saying what it was measured for.

**Residual.** The isolated layers do not add up to the model: batch norms, activations, additions, pooling,
reshapes, Python dispatch between modules and the layers we do not time alone run too. At full width the
residual is ``whole - sum(layers at full width)``. Part of it is per-operation dispatch, which does not
shrink with channels; the rest is elementwise work on the activations (normalisation, activation
functions, additions), which does. Measured here, the second part is most of the residual at batch 32
(24 of MobileNetV2/2's 40 ms on 28 x 28 inputs) and still a third of it at batch 1, so a constant residual
over-predicts a pruned model badly. The table therefore stores a *slope*: the residual is predicted as

    residual(keep) = residual_ms - residual_slope_ms * (1 - activations(keep))

where ``activations`` is the timed layers' output elements kept (each layer's kept output channels times
its output's spatial size, summed, as a fraction of the unpruned model's). The slope is fitted when the table
is measured, from the whole model measured again pruned uniformly at a few levels (``residual_points``),
through the full-width point, so the prediction at full width still equals the measured whole latency by
construction. ``residual_ms - residual_slope_ms`` is what no pruning removes (:attr:`constant_ms`).

Its JSON form is in :mod:`prune_env.latency.codec`; :func:`check_compatible` refuses a table measured for
another model, device, batch, thread count or torch version, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import LatencyTableError
from prune_env.graph.dependency_graph import model_signature
from prune_env.latency.grid import bilinear
from prune_env.latency.measure import Timing

# Bumped whenever the JSON layout or the meaning of a field changes: older files are measured anew.
# 2: layers are timed in the memory format the model runs them in (channels-last for the zoo CNNs), and
# the residual scales with the kept activations.
TABLE_FORMAT = 2
RESIDUAL_RULE = "activations"


@dataclass(frozen=True)
class TableMeta:
    """What a table was measured for. Every field but ``model`` must match for a table to be used."""

    model: str | None  # the architecture's name when known (for people); the hash decides
    model_hash: str
    input_shape: tuple[tuple[int, ...], ...]  # one sample of each input, no batch dimension
    batch: int
    device: str  # "cpu" or "cuda:N"
    device_name: str  # the CPU model or the GPU's name
    threads: int
    torch: str
    format: int = TABLE_FORMAT

    def key_fields(self) -> dict[str, Any]:
        """The fields a cached table is keyed by (and checked against)."""
        return {
            "format": self.format,
            "model_hash": self.model_hash,
            "input_shape": [list(s) for s in self.input_shape],
            "batch": self.batch,
            "device": torch.device(self.device).type,
            "device_name": self.device_name,
            "threads": self.threads,
            "torch": self.torch,
        }


def model_hash(model: nn.Module, input_shape: Sequence[Sequence[int]]) -> str:
    """SHA-256 of the model's structure (every module's type, group counts, tensor shapes and ties; not
    its weights, which do not change latency) and one sample's input shape."""
    signature = {name: list(value) for name, value in model_signature(model).items()}
    payload = json.dumps({"modules": signature, "input": [list(s) for s in input_shape]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class LayerTable:
    """One timed layer's measured grid: ``ms[i][j]`` at ``in_widths[i]`` inputs, ``out_widths[j]`` outputs."""

    term: int
    label: str
    kind: str
    module_type: str
    input_shape: tuple[int, ...]
    in_slot: int | None
    out_slot: int | None
    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]
    noisy: tuple[tuple[bool, ...], ...]
    out_spatial: int = 1  # output elements per output channel per sample

    @property
    def full_ms(self) -> float:
        return self.ms[-1][-1]

    def at(self, width_in: np.ndarray | float, width_out: np.ndarray | float) -> np.ndarray:
        """Milliseconds at the given widths (bilinear between grid points, exact on them)."""
        return bilinear(
            np.array(self.in_widths), np.array(self.out_widths), np.array(self.ms), width_in, width_out
        )


@dataclass(frozen=True)
class LatencyTable:
    """Measured latencies of a model's timed layers and of the whole model, and what they were measured for.

    Attributes:
        meta: the model, input, batch, device, threads and torch version.
        layers: one grid per timed layer (per MACs term of a convolution or linear layer).
        untimed: labels of the MACs terms timed only as part of the whole model (in the residual).
        whole: the unpruned model's measured latency.
        noise: the protocol's relative spread of repeated whole-model medians when it was measured.
        protocol: warm-up, repeats, sample length and noise bound used.
        residual_slope_ms: how much of the residual goes with the activations (module docstring).
        residual_points: ``(activations fraction, residual ms)`` of the uniformly pruned whole-model
            measurements the slope was fitted to.
    """

    meta: TableMeta
    layers: tuple[LayerTable, ...]
    untimed: tuple[str, ...]
    whole: Timing
    noise: float
    protocol: Mapping[str, Any]
    residual_slope_ms: float = 0.0
    residual_points: tuple[tuple[float, float], ...] = ()

    @property
    def layers_full_ms(self) -> float:
        return float(math.fsum(layer.full_ms for layer in self.layers))

    @property
    def residual_ms(self) -> float:
        """What the timed layers leave of the whole model's latency at full width."""
        return self.whole.median_ms - self.layers_full_ms

    @property
    def constant_ms(self) -> float:
        """The part of the residual no pruning removes (per-operation dispatch and the like)."""
        return self.residual_ms - self.residual_slope_ms

    def layer_widths(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each timed layer's (input, output) widths, as (rows x layers) arrays, for ``kept``: the graph's
        kept count per slot, one row per keep vector (``CostModel.kept``)."""
        kept = np.atleast_2d(np.asarray(kept, dtype=np.float64))
        rows = len(kept)
        w_in = np.empty((rows, len(self.layers)))
        w_out = np.empty((rows, len(self.layers)))
        for i, layer in enumerate(self.layers):
            w_in[:, i] = kept[:, layer.in_slot] if layer.in_slot is not None else layer.in_widths[-1]
            w_out[:, i] = kept[:, layer.out_slot] if layer.out_slot is not None else layer.out_widths[-1]
        return w_in, w_out

    def layer_ms(self, w_in: np.ndarray, w_out: np.ndarray) -> np.ndarray:
        """Each timed layer's predicted ms (rows x layers) at the widths :meth:`layer_widths` gives."""
        if not self.layers:
            return np.zeros((len(w_in), 0))
        return np.stack([layer.at(w_in[:, i], w_out[:, i]) for i, layer in enumerate(self.layers)], axis=1)

    def activations(self, w_out: np.ndarray) -> np.ndarray:
        """Per row, the timed layers' output elements at widths ``w_out`` as a fraction of full width."""
        spatial = np.array([layer.out_spatial for layer in self.layers], dtype=np.float64)
        full = float(spatial @ np.array([layer.out_widths[-1] for layer in self.layers], dtype=np.float64))
        return (np.asarray(w_out) @ spatial) / full if full > 0 else np.ones(len(w_out))

    def predict_kept(self, kept: np.ndarray) -> np.ndarray:
        """Predicted ms per row of ``kept`` (slots' kept counts): the layers plus the residual."""
        w_in, w_out = self.layer_widths(kept)
        residual = self.residual_ms - self.residual_slope_ms * (1.0 - self.activations(w_out))
        return self.layer_ms(w_in, w_out).sum(axis=1) + residual

    @property
    def disturbed(self) -> bool:
        """Whether the whole model's repeated medians moved by more than the protocol's noise bound while the
        table was measured: the machine was busy then, and every cell may carry that load's share."""
        return self.noise > float(self.protocol.get("noise_bound", math.inf))

    @property
    def noisy_points(self) -> int:
        """Grid points (and the whole model) whose measurement stayed noisier than the protocol's bound."""
        return sum(sum(row) for layer in self.layers for row in layer.noisy) + int(self.whole.noisy)


def check_compatible(found: TableMeta, wanted: TableMeta, where: str) -> None:
    """Raise :class:`LatencyTableError` naming every field of ``found`` that differs from ``wanted``."""
    ours, theirs = wanted.key_fields(), found.key_fields()
    names = {"model_hash": "model (structure hash)", "device": "device type", "torch": "torch version"}
    diffs = [
        f"{names.get(k, k)} {theirs[k]!r} (here: {ours[k]!r})" for k in ours if theirs.get(k) != ours.get(k)
    ]
    if diffs:
        raise LatencyTableError(
            f"the latency table {where} was measured for another setting: {'; '.join(diffs)}; measure a table "
            "for this one (delete the file, or pass refresh=True / measure with the settings it names)"
        )


__all__ = [
    "RESIDUAL_RULE",
    "TABLE_FORMAT",
    "LatencyTable",
    "LayerTable",
    "TableMeta",
    "check_compatible",
    "model_hash",
]
