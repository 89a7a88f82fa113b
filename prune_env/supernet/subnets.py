"""Sub-networks of one model that share its weights, selected by kept counts through the dependency graph.

A sub-network keeps, per channel group, a prefix of the group's fixed importance ranking — the same
units :meth:`prune_env.problem.PruningProblem.build` keeps — so a policy (kept counts) names one slice
of every shared tensor. :class:`SharedWeights` makes that slice with autograd (a weight-sharing supernet
trains its shared tensors through whichever sub-network it samples) or as a plain, standalone pruned
model for scoring; :class:`StageTaps` adds Stage-wise Pruning's stage inputs and stage losses;
:class:`SubnetSampler` draws the sandwich rule's sub-networks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prune_env.costs import CostModel
from prune_env.graph import DependencyGraph, units_to_keep
from prune_env.supernet.stages import StageBoundary
from prune_env.surgery import ModelRebuilder


class SubnetSampler:
    """The sub-networks one training step uses: the full and the tiniest network (the sandwich rule,
    so every channel is trained in every step) and ``n_random`` random ones, from a seeded generator.

    A random sub-network removes a uniform random fraction in ``[0, max_ratio]`` of every group; the
    tiniest removes ``max_ratio`` everywhere (the least a policy of the problem can keep). With
    ``macs_band=(lo, hi)`` (and the graph's ``costs``) a random sub-network is instead a random
    allocation scaled to a MACs fraction drawn uniformly from the band, as the policies a search at
    that budget scores."""

    def __init__(
        self,
        units: np.ndarray,
        max_ratio: float,
        round_to: int,
        seed: int,
        *,
        costs: CostModel | None = None,
        macs_band: tuple[float, float] | None = None,
    ) -> None:
        self.units = np.asarray(units, dtype=np.int64)
        self.max_ratio = max_ratio
        self.round_to = round_to
        self.rng = np.random.default_rng(seed)
        self.tiniest = units_to_keep(self.units, np.full(len(self.units), max_ratio), round_to)
        self.costs = costs
        self.macs_band = macs_band
        if macs_band is not None and costs is None:
            raise ValueError("a MACs band needs the graph's cost model")

    def random(self) -> np.ndarray:
        if self.macs_band is None or self.costs is None:
            ratios = self.rng.uniform(0.0, self.max_ratio, len(self.units))
            return units_to_keep(self.units, ratios, self.round_to)
        target = self.rng.uniform(*self.macs_band) * self.costs.macs(self.units)
        raw = self.rng.uniform(0.0, 1.0, len(self.units))
        lo, hi = 0.0, 1.0 / max(float(raw.min()), 1e-3)  # scale factors: at `hi` every ratio is capped
        for _ in range(40):
            mid = (lo + hi) / 2
            keep = units_to_keep(self.units, np.minimum(raw * mid, self.max_ratio), self.round_to)
            if self.costs.macs(keep) > target:
                lo = mid
            else:
                hi = mid
        return units_to_keep(self.units, np.minimum(raw * hi, self.max_ratio), self.round_to)

    def sandwich(self, n_random: int) -> list[np.ndarray]:
        return [self.units.copy(), self.tiniest.copy(), *(self.random() for _ in range(n_random))]


class SharedWeights:
    """The sub-networks of ``weights`` (an ``nn.Module`` whose tensors are shared by all of them).

    :meth:`select` rebuilds the sub-network's architecture into one reused module and returns it with
    plain copies of the sliced tensors (a standalone pruned model, as :func:`prune_env.prune_channels`
    would build from ``weights``); :meth:`forward` runs the selected sub-network on tensors sliced *with*
    autograd, so a loss trains ``weights`` (or the ``sources`` tensors given instead of some of them).
    """

    def __init__(self, weights: nn.Module, graph: DependencyGraph, rankings: Sequence[np.ndarray]) -> None:
        self.weights = weights
        self.graph = graph
        self.rankings = [np.asarray(r, dtype=np.int64) for r in rankings]
        self.rebuilder = ModelRebuilder(weights, graph)
        self.module = self.rebuilder.module

    def kept_units(self, keep: np.ndarray) -> list[np.ndarray]:
        """The units a sub-network keeps: the first ``keep[g]`` of group ``g``'s ranking, sorted."""
        return [np.sort(order[: int(k)]) for order, k in zip(self.rankings, keep, strict=True)]

    def select(self, keep: np.ndarray) -> nn.Module:
        """The sub-network keeping ``keep`` (rebuilt into the reused module; valid until the next call)."""
        return self.rebuilder.rebuild(self.kept_units(keep))

    def forward(self, x: torch.Tensor, sources: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The selected sub-network's output on ``x``, differentiable in the shared tensors."""
        out: torch.Tensor = functional_call(self.module, self.rebuilder.tensors(sources), (x,))
        return out

    def kept_positions(self, slot: int) -> torch.Tensor | None:
        return self.rebuilder.kept_positions(slot)

    def slot_fraction(self, slot: int) -> float:
        """The fraction of slot ``slot``'s indices the selected sub-network keeps."""
        kept = self.rebuilder.kept_positions(slot)
        return 1.0 if kept is None else len(kept) / self.graph.slots[slot].size


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error relative to the teacher features' mean square: stages of different scales
    weigh alike."""
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-8)


class StageTaps:
    """Forward hooks at the stage boundaries of a teacher and of a sub-network module.

    While :meth:`record` is active the teacher's boundary outputs are kept; while :meth:`substitute` is
    active each boundary of the sub-network computes its stage loss against the teacher's output there
    (restricted to the channels the sub-network keeps) and hands the *teacher's* features on, so each
    stage learns from the unpruned network's input to it: Stage-wise Pruning's in-place distillation."""

    def __init__(
        self, teacher: nn.Module, shared: SharedWeights, boundaries: Sequence[StageBoundary]
    ) -> None:
        self.boundaries = list(boundaries)
        self.shared = shared
        self.recording = False
        self.features: dict[str, torch.Tensor] = {}
        self.losses: list[torch.Tensor] | None = None
        teacher_modules = dict(teacher.named_modules())
        student_modules = dict(shared.module.named_modules())
        for b in self.boundaries:
            teacher_modules[b.module].register_forward_hook(self._teacher_hook(b))
            student_modules[b.module].register_forward_hook(self._student_hook(b))

    def _teacher_hook(self, boundary: StageBoundary) -> Any:
        def hook(_m: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            if self.recording:
                self.features[boundary.module] = out.detach()

        return hook

    def _student_hook(self, boundary: StageBoundary) -> Any:
        def hook(_m: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor | None:
            if self.losses is None:
                return None
            target = self.features[boundary.module]
            kept = self.shared.kept_positions(boundary.slot)
            if kept is not None:
                target = target.index_select(1, kept.to(target.device))
            if target.shape != out.shape:
                raise RuntimeError(
                    f"stage boundary {boundary.module}: the sub-network's output {tuple(out.shape)} does not "
                    f"match the teacher's kept channels {tuple(target.shape)}"
                )
            self.losses.append(feature_loss(out, target))
            return target

        return hook

    @torch.no_grad()
    def record(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``x``; its boundary features are kept for the next sub-networks."""
        self.recording = True
        try:
            logits: torch.Tensor = teacher(x)
        finally:
            self.recording = False
        return logits

    def substitute(self, run: Any) -> tuple[Any, list[torch.Tensor]]:
        """``run()`` with stage substitution on; returns its result and the stage losses in order."""
        self.losses = []
        try:
            result = run()
            return result, self.losses
        finally:
            self.losses = None
