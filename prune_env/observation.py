"""Observation features: per-group statistics of the network, normalised to [0, 1].

Static features are computed once per problem (AMC's layer embedding plus weight statistics and an optional
sensitivity); the dynamic ones of the layer-wise environment are cost-model arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidSettingError
from prune_env.importance import l1_importance
from prune_env.problem import PruningProblem

STATIC_FEATURES = (
    "position", "is_linear", "grouped_conv", "in_channels", "units", "kernel_area", "stride",
    "macs_share", "params_share", "l1_mean", "l1_spread", "bn_gamma_mean", "bn_gamma_spread", "sensitivity",
)  # fmt: skip
DYNAMIC_FEATURES = ("macs_removed", "macs_reducible_left", "previous_ratio", "target")
# Joint policies (pruning + quantization), layer-wise environment: the previous group's bits / 32.
JOINT_FEATURES = ("previous_weight_bits", "previous_activation_bits")
# A latency budget only, after the static features: the share of the predicted latency a group's width
# decides (what pruning it alone to one unit saves), as macs_share is for MACs.
LATENCY_FEATURES = ("latency_share",)


def _spread(values: np.ndarray) -> float:
    """Coefficient of variation squashed to [0, 1)."""
    mean = float(np.mean(np.abs(values))) if values.size else 0.0
    if mean == 0.0:
        return 0.0
    cv = float(np.std(values)) / mean
    return cv / (1.0 + cv)


def _normalise_columns(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max(axis=0)
    return x / np.where(peak > 0, peak, 1.0)


def static_features(problem: PruningProblem, sensitivity: np.ndarray | None = None) -> np.ndarray:
    """A (groups × len(STATIC_FEATURES)) float32 matrix with entries in [0, 1]; under a latency budget
    followed by the :data:`LATENCY_FEATURES` column."""
    graph, model = problem.graph, problem.base_model
    n = problem.n_groups
    full = problem.units
    rows = []
    for i, group in enumerate(graph.groups):
        producer = model.get_submodule(group.producers[0].layer)
        lone = full.copy()
        lone[i] = 1
        l1 = l1_importance(group, model) / max(sum(m.multiplicity for m in group.members), 1)
        weights = [(m, getattr(model.get_submodule(m.layer), "weight", None)) for m in group.members]
        gammas = [
            np.abs(w.detach().cpu().numpy()[list(m.positions)])
            for m, w in weights
            if m.kind == "channel" and isinstance(w, torch.Tensor)
        ]
        g = np.concatenate(gammas) if gammas else np.zeros(0)
        row = {
            "position": i / max(n - 1, 1),
            "is_linear": float(isinstance(producer, nn.Linear)),
            "grouped_conv": float(
                any(
                    getattr(model.get_submodule(m.layer), "groups", 1) > 1
                    for m in group.members
                    if m.kind != "param"
                )
            ),
            "in_channels": getattr(producer, "in_channels", getattr(producer, "in_features", 0)),
            "units": group.units,
            "kernel_area": float(np.prod(getattr(producer, "kernel_size", (1,)))),
            "stride": float(max(getattr(producer, "stride", (1,))) > 1),
            "macs_share": 1.0 - graph.costs.macs(lone) / graph.base_macs,
            "params_share": 1.0 - graph.costs.params(lone) / graph.base_params,
            "l1_mean": float(np.mean(l1)),
            "l1_spread": _spread(l1),
            "bn_gamma_mean": float(g.mean()) if g.size else 0.0,
            "bn_gamma_spread": _spread(g),
            "sensitivity": 0.0 if sensitivity is None else sensitivity[i],
        }
        rows.append([row[name] for name in STATIC_FEATURES])
    raw = np.array(rows, dtype=np.float64).reshape(n, len(STATIC_FEATURES))
    # Unbounded magnitudes become fractions of the network's largest value.
    for name in ("in_channels", "units", "kernel_area", "l1_mean", "bn_gamma_mean"):
        col = STATIC_FEATURES.index(name)
        raw[:, col] = _normalise_columns(raw[:, col : col + 1])[:, 0]
    if problem.latency is not None:
        raw = np.hstack([raw, latency_shares(problem)[:, None]])
    return np.clip(raw, 0.0, 1.0).astype(np.float32)


def latency_shares(problem: PruningProblem) -> np.ndarray:
    """Per group: the fraction of the predicted latency saved by pruning that group alone to one unit, all
    groups priced in one batched prediction (negative where the table times the narrow layer slower; the
    observation clips it to 0)."""
    if problem.latency is None:
        raise InvalidSettingError(
            f"latency shares price a latency budget; this problem's budget is {problem.metric}: give it "
            "target_latency"
        )
    lone = np.repeat(problem.units[None, :], problem.n_groups, axis=0)
    np.fill_diagonal(lone, 1)
    return 1.0 - np.asarray(problem.latency.predict(lone), dtype=np.float64) / problem.projector.base_cost


def sensitivity(problem: PruningProblem, ratio: float = 0.5) -> np.ndarray:
    """Proxy accuracy drop (relative to the base) when one group alone loses ``ratio`` of its channels.

    Costs one proxy evaluation per group; no budget projection (the point is the group's own effect).
    """
    drops = np.zeros(problem.n_groups)
    for i in range(problem.n_groups):
        keep = problem.units.copy()
        keep[i] = max(1, round(keep[i] * (1 - ratio)))
        acc = problem.evaluate_keep(keep).accuracy
        drops[i] = max(0.0, problem.base_accuracy - acc) / max(problem.base_accuracy, 1e-8)
    return np.clip(drops, 0.0, 1.0)
