"""The latency table as a value: per timed layer a grid of measured milliseconds, the whole model's
measured latency, the residual between them, and the metadata saying what it was measured for.

**Residual.** The isolated layers do not add up to the model: batch norms, activations, additions, pooling,
reshapes, Python dispatch between modules and the layers we do not time alone run too. The table stores
``residual = whole - sum(layers at full width)`` and predictions keep it **constant**. Why constant rather
than scaled with the kept activations: at the small inputs and batches this project runs, the residual is
dominated by per-operation dispatch, which does not shrink with channels; it may even be negative (each
isolated layer pays its own call overhead and cold input), and a scaled negative number means nothing. A
constant residual errs on the safe side -- a pruned model is predicted no faster than its timed layers
make it -- and makes the prediction at full width equal the measured whole latency by construction.

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
TABLE_FORMAT = 1
RESIDUAL_RULE = "constant"


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
    """

    meta: TableMeta
    layers: tuple[LayerTable, ...]
    untimed: tuple[str, ...]
    whole: Timing
    noise: float
    protocol: Mapping[str, Any]

    @property
    def layers_full_ms(self) -> float:
        return float(math.fsum(layer.full_ms for layer in self.layers))

    @property
    def residual_ms(self) -> float:
        """What the timed layers leave of the whole model's latency (kept constant when predicting)."""
        return self.whole.median_ms - self.layers_full_ms

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
