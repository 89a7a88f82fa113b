"""What a problem with joint policies (pruning + quantization) adds: for each group, the layers its bits
set; the budget on BitOps or size; scoring with simulated quantization after the problem's proxy; and the
mapping from actions in ``[-1, 1]`` to bit-widths."""

from __future__ import annotations

import numpy as np
from torch import nn

from prune_env.graph import DependencyGraph
from prune_env.proxy import Proxy, ProxyContext
from prune_env.quantization.bits import BIT_CHOICES, FULL_PRECISION, BitPlan, group_layers, quantizable_layers
from prune_env.quantization.budget import JointProjector
from prune_env.quantization.costs import bitops, size_bits
from prune_env.quantization.proxy import QuantizedScoring
from prune_env.settings import JOINT_METRICS, ProblemSettings


class JointPolicies:
    """The quantization half of a :class:`~prune_env.problem.PruningProblem` whose policies choose bits."""

    def __init__(self, model: nn.Module, graph: DependencyGraph, settings: ProblemSettings) -> None:
        self.graph = graph
        self.group_layers = group_layers(graph, model)
        self.layers = quantizable_layers(model)
        self.constrained = settings.metric in JOINT_METRICS  # else bits are free and MACs/params constrain
        self.projector = JointProjector(
            graph.costs,
            [g.units for g in graph.groups],
            self.group_layers,
            self.layers,
            metric=settings.metric if self.constrained else "bitops",
            max_ratio=settings.max_ratio,
            round_to=settings.round_to,
            other_bits=settings.other_bits,
        )
        self._scoring: QuantizedScoring | None = None
        full = graph.costs.full_keep()
        self.base_bitops = graph.costs.macs(full) * FULL_PRECISION**2
        self.base_size_bits = graph.costs.params(full) * FULL_PRECISION

    def score_with(self, proxy: Proxy, context: ProxyContext) -> None:
        """Score policies with ``proxy`` (the problem's, once it is built), then simulated quantization."""
        self._scoring = QuantizedScoring(proxy, context)

    @property
    def scoring(self) -> QuantizedScoring:
        if self._scoring is None:
            raise RuntimeError("JointPolicies.score_with(proxy, context) must be called before scoring")
        return self._scoring

    @staticmethod
    def bits_for(unit: np.ndarray) -> np.ndarray:
        """Bit-widths for values in ``[0, 1]`` (an action in ``[-1, 1]`` mapped affinely): the interval split
        evenly over :data:`BIT_CHOICES`, 0 the fewest bits, 1 full precision."""
        x = np.clip(np.asarray(unit, dtype=np.float64), 0.0, 1.0)
        index = np.minimum((x * len(BIT_CHOICES)).astype(np.int64), len(BIT_CHOICES) - 1)
        return np.asarray(BIT_CHOICES, dtype=np.int64)[index]

    def plan(self, weight_bits: np.ndarray, activation_bits: np.ndarray) -> BitPlan:
        return self.projector.plan(weight_bits, activation_bits)

    def costs(
        self, keep: np.ndarray, weight_bits: np.ndarray, activation_bits: np.ndarray
    ) -> tuple[int, int]:
        """``(BitOps, size in bits)`` of the policy."""
        plan = self.plan(weight_bits, activation_bits)
        return bitops(self.graph.costs, keep, plan), size_bits(self.graph.costs, keep, plan)
