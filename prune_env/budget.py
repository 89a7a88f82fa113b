"""Budget projection: AMC's "action wall", generalised to dependency groups.

Everything here is arithmetic on the graph's cost model or on a latency table's predictions — no forward
passes — so it is cheap enough for every environment step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from prune_env.costs import CostModel
from prune_env.errors import InvalidRatiosError, InvalidSettingError
from prune_env.graph import unit_count_to_keep, units_to_keep
from prune_env.settings import DEFAULT_MAX_RATIO
from prune_env.validation import check_settings, fraction


def keep_to_ratios(channels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The ratios that :func:`prune_env.graph.units_to_keep` maps back to exactly ``keep``."""
    return 1.0 - np.asarray(keep, dtype=np.float64) / channels


def check_reachable(
    metric: str, target: float, minimum: float, max_ratio: float, how: str = "", detail: str = ""
) -> None:
    """Refuse a target outside (0, 1] or below the ``minimum`` cost ratio reachable by pruning every group
    by ``max_ratio`` (``how``: what else the minimum assumes, e.g. the fewest bits; ``detail``: what the
    minimum is in other units, worded after it, e.g. milliseconds)."""
    fraction(f"target {metric}", target)
    if target < minimum:
        raise InvalidSettingError(
            f"target {metric} {target:.4g} is impossible: pruning every group by max_ratio={max_ratio}{how} "
            f"still leaves {minimum:.4g}{detail}; raise max_ratio or the target"
        )


def rounding_collapses(units: np.ndarray, max_ratio: float, round_to: int) -> np.ndarray:
    """Per group: whether pruning it by ``max_ratio`` leaves fewer channels than a multiple of ``round_to``
    can hold — the kept count rounds to zero multiples and falls to one channel, more than ``max_ratio``
    removes and off the ``round_to`` grid. (Nearest rounding to a nonzero multiple is not a collapse.)"""
    units = np.asarray(units, dtype=np.int64)
    floor = units * (1.0 - max_ratio)  # the fewest channels max_ratio lets a group keep
    kept = units_to_keep(units, np.full(len(units), max_ratio), round_to)
    return (kept < floor - 1e-9) & (kept % round_to != 0) & (kept < units)


def check_rounding(
    units: Sequence[int] | np.ndarray, max_ratio: float, round_to: int, names: Sequence[str] | None = None
) -> None:
    """Refuse a ``round_to`` and ``max_ratio`` that cannot both hold for some group (see
    :func:`rounding_collapses`): the projection would prune such a group to one channel whenever it is
    pruned near ``max_ratio``, overriding both settings without a word. The message names the groups and
    the largest ``max_ratio`` and ``round_to`` that work."""
    units = np.asarray(units, dtype=np.int64)
    collapsed = np.flatnonzero(rounding_collapses(units, max_ratio, round_to))
    if not collapsed.size:
        return
    label = [f"{names[g]!r}" if names is not None else f"group {g}" for g in range(len(units))]
    shown = ", ".join(f"{label[g]} ({units[g]} channels)" for g in collapsed[:4])
    fixes = []
    smallest = int(units[collapsed].min())
    if round_to < smallest:  # keeping exactly one multiple of round_to in every affected group works
        fixes.append(f"max_ratio={math.floor((1 - round_to / smallest) * 1000) / 1000:g} or lower")
    smaller = round_to - 1
    while smaller > 1 and rounding_collapses(units, max_ratio, smaller).any():
        smaller = min(smaller - 1, int(np.ceil(2 * units[collapsed] * (1.0 - max_ratio)).min()))
    fixes.append(f"round_to={smaller} or lower")
    raise InvalidSettingError(
        f"round_to={round_to} and max_ratio={max_ratio:g} cannot both hold for {shown}"
        + (f" and {len(collapsed) - 4} more groups" if len(collapsed) > 4 else "")
        + f": pruned by max_ratio, each keeps fewer channels than one multiple of {round_to}, so rounding "
        f"would leave it 1 channel; use {', or '.join(fixes)}"
    )


class PredictedCost(Protocol):
    """A cost of kept-units-per-group vectors that no bilinear cost model describes (a latency table's).

    ``predict`` takes one keep vector (a float back) or a 2-D array of them, one per row (an array back);
    ``describe_floor`` words the smallest reachable cost for a refusal (e.g. its milliseconds).
    Predictions need not be monotone in the kept counts: the projector checks every answer exactly.
    """

    def predict(self, keep: Any) -> Any: ...

    def describe_floor(self, keep: np.ndarray, target: float) -> str: ...


class BudgetProjector:
    """Projects pruning decisions so the pruned model never exceeds the cost target.

    ``metric`` is "macs" or "params" (exact costs from ``costs``), or "latency" with ``predicted``, the
    cost function that prices keep vectors (a :class:`PredictedCost`, e.g.
    :class:`prune_env.latency.budget.LatencyCost`); ``target`` a fraction of the unpruned cost. Ratios are
    capped at ``max_ratio``; construction fails if even pruning every group to ``max_ratio`` cannot meet
    the target, or if ``round_to`` is too coarse for ``max_ratio`` (:func:`check_rounding`; ``names``: the
    groups' names for its message).
    """

    def __init__(
        self,
        costs: CostModel,
        units: Sequence[int] | np.ndarray,
        *,
        metric: str = "macs",
        max_ratio: float = DEFAULT_MAX_RATIO,
        round_to: int = 1,
        names: Sequence[str] | None = None,
        predicted: PredictedCost | None = None,
    ) -> None:
        check_settings({"metric": metric, "max_ratio": max_ratio, "round_to": round_to})
        if (metric == "latency") != (predicted is not None):
            raise InvalidSettingError(
                "a latency budget is priced by a latency model and only a latency budget is: pass "
                "predicted=LatencyCost(latency_model(...)) with metric='latency', and neither otherwise"
                if predicted is None
                else f"predicted costs price a latency budget, not {metric}: pass metric='latency'"
            )
        check_rounding(units, max_ratio, round_to, names)
        self.costs = costs
        self.units = np.asarray(units, dtype=np.int64)  # per group
        self.metric = metric
        self.max_ratio = max_ratio
        self.round_to = round_to
        self.predicted = predicted
        self._batch: Any
        self._exact: Any
        if predicted is not None:
            # One function prices one vector and many: the batch and the exact check agree by construction.
            self._batch = self._exact = predicted.predict
        else:
            self._batch = costs.macs_batch if metric == "macs" else costs.params_batch
            self._exact = costs.macs if metric == "macs" else costs.params
        self.base_cost = self._exact(self.units)
        self.min_keep = units_to_keep(self.units, np.full(len(self.units), max_ratio), round_to)
        # The cheapest allocation the projection falls back on. Costs that only fall as counts do have it
        # at min_keep; a predicted latency need not (a measured table may time a narrow layer slower than a
        # wider one), so there it is the fastest uniform pruning up to max_ratio, and every fallback — the
        # projection's and the wall's — is that allocation, which the target check made sure fits.
        self.floor_keep = self.min_keep if predicted is None else self._fastest_uniform()
        self.min_cost_ratio = self._exact(self.floor_keep) / self.base_cost

    def _fastest_uniform(self) -> np.ndarray:
        ratios = np.linspace(0.0, self.max_ratio, 65)
        keeps = units_to_keep(self.units, np.repeat(ratios[:, None], len(self.units), axis=1), self.round_to)
        keeps[-1] = self.min_keep  # exactly max_ratio's allocation among the candidates
        best = keeps[int(np.argmin(self._batch(keeps)))]
        exact = [float(self._exact(k)) for k in (best, self.min_keep)]
        return best if exact[0] < exact[1] else self.min_keep

    def check_target(self, target: float) -> None:
        if self.predicted is None:
            check_reachable(self.metric, target, self.min_cost_ratio, self.max_ratio)
            return
        detail = self.predicted.describe_floor(self.floor_keep, target)
        how = "" if np.array_equal(self.floor_keep, self.min_keep) else " or any less, uniformly,"
        check_reachable(self.metric, target, self.min_cost_ratio, self.max_ratio, how, detail)

    def cost_ratio(self, keep: np.ndarray) -> float:
        return float(self._exact(np.asarray(keep, dtype=np.int64)) / self.base_cost)

    def batch_cost_ratios(self, keeps: np.ndarray) -> np.ndarray:
        """Cost ratios of many keep vectors (rows) at once, in floating point: for ranking candidates only
        (:meth:`cost_ratio` is exact for MACs and parameters)."""
        return np.asarray(self._batch(np.asarray(keeps)), dtype=np.float64) / self.base_cost

    def along_group(self, keep: np.ndarray, index: int, counts: np.ndarray) -> np.ndarray:
        """The cost of ``keep`` with group ``index`` at each of ``counts`` in turn (the others as they are):
        the quadratic of the cost model for MACs and parameters, one batched prediction otherwise."""
        counts = np.asarray(counts, dtype=np.int64)
        if self.predicted is None:
            a, b, q = self.costs.along_group(keep, index, self.metric)
            k = counts.astype(np.float64)
            return np.asarray(a + b * k + q * k * k, dtype=np.float64)
        rows = np.repeat(np.asarray(keep, dtype=np.int64)[None, :], len(counts), axis=0)
        rows[:, index] = counts
        return np.asarray(self._batch(rows), dtype=np.float64)

    def _fits(self, keep: np.ndarray, target: float) -> bool:
        return self._exact(keep) <= target * self.base_cost

    def project(self, ratios: np.ndarray, target: float, *, fill: bool = False) -> np.ndarray:
        """Keep counts for ``ratios`` pushed (if needed) until the cost meets ``target``.

        Each ratio moves toward ``max_ratio`` in proportion to its remaining room, ``r + α(max - r)``, with
        the smallest α that fits: the agent's relative preferences survive, its budget violation does not.
        ``fill``: also treat the target as the budget to spend — a policy under it is scaled back,
        ``γ·r`` with the smallest γ ≤ 1 that still fits, so it ends just under the target too.
        """
        r = np.clip(np.asarray(ratios, dtype=np.float64), 0.0, self.max_ratio)
        keep = units_to_keep(self.units, r, self.round_to)
        if self._fits(keep, target):
            return self._fill(r, keep, target) if fill else keep
        lo, hi = 0.0, 1.0
        for _ in range(3):  # coarse-to-fine: each round evaluates a grid of α in one vectorised call
            alphas = np.linspace(lo, hi, 33)
            grid = units_to_keep(self.units, r + alphas[:, None] * (self.max_ratio - r), self.round_to)
            ok = self._batch(grid) <= target * self.base_cost * (1 + 1e-12)
            first = int(np.argmax(ok)) if ok.any() else len(alphas) - 1
            lo, hi = alphas[max(first - 1, 0)], alphas[first]
        for alpha in (hi, 1.0):
            keep = units_to_keep(self.units, r + alpha * (self.max_ratio - r), self.round_to)
            if self._fits(keep, target):
                return keep
        if self._fits(self.floor_keep, target):  # a latency whose fastest allocation is not min_keep
            return self.floor_keep.copy()
        raise InvalidRatiosError(f"target {target} cannot be met (minimum {self.min_cost_ratio:.4f})")

    def _fill(self, r: np.ndarray, keep: np.ndarray, target: float) -> np.ndarray:
        """``keep`` (which fits) grown to ``γ·r`` with the smallest γ in [0, 1] that still fits."""
        limit = target * self.base_cost * (1 + 1e-12)
        lo, hi = 0.0, 1.0  # γ = 1 is ``keep`` and fits; cost only falls as γ grows
        for _ in range(3):  # coarse-to-fine, as in project()
            gammas = np.linspace(lo, hi, 33)
            ok = self._batch(units_to_keep(self.units, gammas[:, None] * r, self.round_to)) <= limit
            first = int(np.argmax(ok)) if ok.any() else len(gammas) - 1
            lo, hi = gammas[max(first - 1, 0)], gammas[first]
        filled = units_to_keep(self.units, hi * r, self.round_to)
        return filled if self._fits(filled, target) else keep  # the exact check has the last word

    def wall(self, decided: np.ndarray, index: int, ratio: float, target: float) -> int:
        """AMC's action wall for group ``index``: the largest keep count <= the requested one such that,
        with earlier groups as ``decided`` and every later group pruned to ``max_ratio`` (for a latency, at
        the fastest allocation, ``floor_keep``), the target is met.
        """
        keep = np.array(decided, dtype=np.int64)
        keep[index + 1 :] = self.floor_keep[index + 1 :]
        wanted = unit_count_to_keep(int(self.units[index]), float(ratio), self.round_to)
        lowest = int(self.min_keep[index])
        candidates = np.arange(wanted, lowest - 1, -1) if wanted >= lowest else np.array([lowest])
        if self.round_to > 1:
            on_grid = (candidates % self.round_to == 0) | (candidates == lowest)
            candidates = candidates[on_grid] if on_grid.any() else candidates
        limit = target * self.base_cost
        if self.predicted is not None:
            # One batched prediction prices every candidate. Predictions need not fall as counts do (aligned
            # widths may run faster), so every candidate is priced, not only until the first that fits.
            prices = self.along_group(keep, index, candidates)
            for k in candidates[prices <= limit].tolist():
                keep[index] = k
                if self._fits(keep, target):  # the exact prediction has the last word
                    return int(k)
            # Earlier groups at their walls and the rest at the floor fit (by induction from the floor).
            return int(self.floor_keep[index])
        # With every other group fixed the cost is an exact quadratic in this group's count: one cost-model
        # evaluation prices every candidate, no grid of full evaluations.
        a, b, q = self.costs.along_group(keep, index, self.metric)
        for k in candidates.tolist():
            if a + b * k + q * k * k <= limit:
                keep[index] = k
                if self._fits(keep, target):  # the full evaluation has the last word
                    return int(k)
        return lowest  # earlier decisions already used the budget; the final check stays exact
