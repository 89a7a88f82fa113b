"""Budgets on BitOps or model size for joint policies: kept channels and bits per group, never over budget.

A joint policy is, per channel group, a pruning ratio and the bits of the weights and inputs of the layers
producing the group's channels (:func:`~prune_env.quantization.bits.group_layers`); every other convolution
and linear layer keeps ``other_bits``. With the bits fixed, BitOps and size are bilinear in the kept counts
like MACs — the cost model reweighted per layer — so the pruning part is projected exactly as for MACs
(:class:`~prune_env.budget.BudgetProjector`). When the chosen bits leave no pruning that fits, every
group's bits drop one step of :data:`BIT_CHOICES` (those at the lowest stay) until one does: the budget
decides how far quantization must go, the policy's relative choices survive. Budgets are fractions of the
unpruned model at full precision (32-bit weights and activations).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prune_env.budget import BudgetProjector, check_reachable
from prune_env.costs import CostModel
from prune_env.errors import InvalidSettingError
from prune_env.quantization.bits import BIT_CHOICES, FULL_PRECISION, BitPlan, check_bits, plan_from_groups
from prune_env.settings import JOINT_METRICS
from prune_env.validation import check_settings

PROJECTORS_KEPT = 32  # reweighted cost models remembered, one per recent choice of bits


def lower_bits(bits: np.ndarray, choices: Sequence[int] = BIT_CHOICES) -> np.ndarray:
    """Each width one step down ``choices`` (sorted ascending); the lowest stays."""
    ordered = sorted(choices)
    return np.array([ordered[max(0, ordered.index(int(b)) - 1)] for b in bits], dtype=np.int64)


class JointProjector:
    """Projects joint policies (ratios, weight bits, activation bits per group) onto a BitOps or size budget.

    Args:
        costs: the dependency graph's cost model (``graph.costs``).
        units: channels (units) per group.
        group_layers: per group, the layers its bits set (:func:`~prune_env.quantization.bits.group_layers`).
        layers: every quantizable layer (:func:`~prune_env.quantization.bits.quantizable_layers`).
        metric: ``"bitops"`` or ``"size"``.
        other_bits: weights and inputs of layers outside every group (e.g. the classifier).
    """

    def __init__(
        self,
        costs: CostModel,
        units: Sequence[int] | np.ndarray,
        group_layers: Sequence[Sequence[str]],
        layers: Sequence[str],
        *,
        metric: str = "bitops",
        max_ratio: float = 0.9,
        round_to: int = 1,
        other_bits: int = 8,
    ) -> None:
        if metric not in JOINT_METRICS:
            raise InvalidSettingError(f"metric must be one of {JOINT_METRICS}, got {metric!r}")
        check_settings({"max_ratio": max_ratio, "round_to": round_to})
        check_bits("other_bits", other_bits)
        self.costs, self.units = costs, np.asarray(units, dtype=np.int64)
        self.group_layers = [tuple(g) for g in group_layers]
        if len(self.group_layers) != len(self.units):
            raise InvalidSettingError(
                f"expected {len(self.units)} groups of layers, got {len(self.group_layers)}"
            )
        self.layers, self.metric = list(layers), metric
        self.max_ratio, self.round_to, self.other_bits = max_ratio, round_to, other_bits
        # Which group's bits weigh each cost term, once: reweighting for a policy is then one gather.
        self._term_bits = {kind: self._attribute(kind) for kind in ("macs", "params")}
        self._projectors: dict[tuple[int, ...], BudgetProjector] = {}  # the last few bit choices
        full = costs.full_keep()
        self.base_cost = (
            costs.macs(full) * FULL_PRECISION**2
            if metric == "bitops"
            else costs.params(full) * FULL_PRECISION
        )
        lowest = np.full(len(self.units), min(BIT_CHOICES), dtype=np.int64)
        at_lowest = self._projector(lowest, lowest)
        self.min_cost_ratio = at_lowest.min_cost_ratio * at_lowest.base_cost / self.base_cost

    def _attribute(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Per ``"macs"`` or ``"params"`` term of the cost model: the group whose bits weigh it (-1: none)
        and the bits of the others (``other_bits`` for a quantizable layer outside every group, 32 for
        what is never quantized). A MACs term is its layer's; a parameter term quantized only for a
        layer's ``weight``."""
        group_of = {layer: g for g, names in enumerate(self.group_layers) for layer in names}
        quantizable = set(self.layers)
        groups, fixed = [], []
        for label in self.costs.macs_labels if kind == "macs" else self.costs.params_labels:
            layer, _, attr = label.rpartition(".") if kind == "params" else (label, "", "weight")
            quantized = attr == "weight" and layer in quantizable
            groups.append(group_of.get(layer, -1) if quantized else -1)
            fixed.append(self.other_bits if quantized else FULL_PRECISION)
        return np.array(groups, dtype=np.int64), np.array(fixed, dtype=np.int64)

    def term_bits(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(group, fixed_bits)`` per ``"macs"`` or ``"params"`` term (see :meth:`_attribute`): what a
        differentiable re-implementation of the weighted costs needs (SeerNet's barrier)."""
        return self._term_bits[kind]

    def plan(
        self, weight_bits: Sequence[int] | np.ndarray, activation_bits: Sequence[int] | np.ndarray
    ) -> BitPlan:
        """The bit plan of per-group bits (other quantizable layers at ``other_bits``)."""
        return plan_from_groups(self.group_layers, self.layers, weight_bits, activation_bits, self.other_bits)

    def weighted_costs(
        self, weight_bits: Sequence[int] | np.ndarray, activation_bits: Sequence[int] | np.ndarray
    ) -> CostModel:
        """The cost model whose "macs" are this policy's BitOps and whose "params" its size in bits."""
        return self._projector(*self.checked_bits(weight_bits, activation_bits)).costs

    def _weights(self, kind: str, weight_bits: np.ndarray, activation_bits: np.ndarray) -> np.ndarray:
        group, fixed = self._term_bits[kind]
        grouped, index = group >= 0, np.maximum(group, 0)
        w = np.where(grouped, weight_bits[index], fixed)
        return w * np.where(grouped, activation_bits[index], fixed) if kind == "macs" else w

    def _projector(self, weight_bits: np.ndarray, activation_bits: np.ndarray) -> BudgetProjector:
        """The projector of the cost model reweighted by these bits (remembered for the last few bit
        choices: the layer-wise wall and evolution ask for the same ones again and again)."""
        key = (*weight_bits.tolist(), *activation_bits.tolist())
        projector = self._projectors.pop(key, None)
        if projector is None:
            weighted = self.costs.reweighted(
                self._weights("macs", weight_bits, activation_bits).tolist(),
                self._weights("params", weight_bits, activation_bits).tolist(),
            )
            projector = BudgetProjector(
                weighted,
                self.units,
                metric="macs" if self.metric == "bitops" else "params",
                max_ratio=self.max_ratio,
                round_to=self.round_to,
            )
        self._projectors[key] = projector  # most recent last
        if len(self._projectors) > PROJECTORS_KEPT:
            del self._projectors[next(iter(self._projectors))]
        return projector

    def cost_ratio(
        self,
        keep: np.ndarray,
        weight_bits: Sequence[int] | np.ndarray,
        activation_bits: Sequence[int] | np.ndarray,
    ) -> float:
        """BitOps (or size) of the policy as a fraction of the full-precision unpruned model's."""
        weighted = self.weighted_costs(weight_bits, activation_bits)
        keep = np.asarray(keep, dtype=np.int64)
        cost = weighted.macs(keep) if self.metric == "bitops" else weighted.params(keep)
        return cost / self.base_cost

    def check_target(self, target: float) -> None:
        how = f" at {min(BIT_CHOICES)} bits"
        check_reachable(self.metric, target, self.min_cost_ratio, self.max_ratio, how)

    def checked_bits(
        self, weight_bits: Sequence[int] | np.ndarray, activation_bits: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both bit-widths per group as integer arrays, each checked (one per group, 2..16 or 32)."""
        for name, given in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            try:
                flat = np.ndim(given) == 1
            except ValueError:  # ragged
                flat = False
            if not flat:
                raise InvalidSettingError(
                    f"{name} must be a flat sequence of integers (one width per group), got {given!r:.80}"
                )
        w = [check_bits("weight bits", b) for b in np.asarray(weight_bits).tolist()]
        a = [check_bits("activation bits", b) for b in np.asarray(activation_bits).tolist()]
        if len(w) != len(self.units) or len(a) != len(self.units):
            raise InvalidSettingError(
                f"expected {len(self.units)} weight and activation bit-widths (one per group), got "
                f"{len(w)} and {len(a)}"
            )
        return np.array(w, dtype=np.int64), np.array(a, dtype=np.int64)

    def wall(
        self,
        decided: np.ndarray,
        decided_weight_bits: np.ndarray,
        decided_activation_bits: np.ndarray,
        index: int,
        ratio: float,
        weight_bits: int,
        activation_bits: int,
        target: float,
    ) -> tuple[int, int, int]:
        """AMC's action wall for one group of a joint policy: ``(kept, weight bits, activation bits)`` for
        group ``index`` — the largest count <= the requested one at the requested bits such that, with
        earlier groups as decided and every later group at its minimum (``max_ratio``, lowest bits), the
        target is met; the group's bits are lowered a step at a time when no count fits at them."""
        w = np.array(decided_weight_bits, dtype=np.int64)
        a = np.array(decided_activation_bits, dtype=np.int64)
        lowest = min(BIT_CHOICES)
        w[index + 1 :], a[index + 1 :] = lowest, lowest
        w[index], a[index] = (
            check_bits("weight bits", weight_bits),
            check_bits("activation bits", activation_bits),
        )
        keep = np.array(decided, dtype=np.int64)
        while True:
            projector = self._projector(w, a)
            local = target * self.base_cost / projector.base_cost
            k = projector.wall(keep, index, ratio, local)
            keep[index] = k
            keep[index + 1 :] = projector.min_keep[index + 1 :]
            fits = projector.cost_ratio(keep) <= local * (1 + 1e-12)
            lowered = lower_bits(w[index : index + 1])[0], lower_bits(a[index : index + 1])[0]
            if fits or lowered == (w[index], a[index]):
                return int(k), int(w[index]), int(a[index])
            w[index], a[index] = lowered

    def project(
        self,
        ratios: np.ndarray,
        weight_bits: Sequence[int] | np.ndarray,
        activation_bits: Sequence[int] | np.ndarray,
        target: float,
        *,
        fill: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keep, weight_bits, activation_bits)`` within ``target``: the bits as given if some pruning
        fits with them (the ratios then projected as for MACs), else lowered step by step."""
        self.check_target(target)
        w, a = self.checked_bits(weight_bits, activation_bits)
        while True:
            projector = self._projector(w, a)
            # The target in the reweighted model's own terms (its base is the unpruned model at these bits).
            local = target * self.base_cost / projector.base_cost
            if local >= projector.min_cost_ratio:
                return projector.project(ratios, local, fill=fill), w, a
            lowered_w, lowered_a = lower_bits(w), lower_bits(a)
            if np.array_equal(lowered_w, w) and np.array_equal(lowered_a, a):  # excluded by check_target
                raise InvalidSettingError(f"target {self.metric} {target} cannot be met")
            w, a = lowered_w, lowered_a
