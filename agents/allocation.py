"""Non-learned allocation baselines: global channel ranking and HALP's knapsack.

Both decide how many units each group keeps from the problem's channel importance alone, with exact costs,
and spend one evaluation per allocation (deterministic: a spare budget is left unused).

- ``global`` — Torch-Pruning's global pruning: every unit's importance divided by its group's mean, units
  removed in ascending normalised importance across all groups until the budget is met.
- ``knapsack`` — HALP (Shen et al. 2022, "Structural Pruning via Latency-Saliency Knapsack"): per group and
  kept count, value = the importance kept (normalised over the whole model), weight = the group's cost
  (its predicted latency under a latency budget);
  the multiple-choice knapsack solved by dynamic programming over discretised cost
  (:func:`solve_multiple_choice_knapsack`).

Per-layer sensitivity (``sensitivity``) lives in :mod:`agents.sensitivity` and shares :class:`Widths`.

The problem prunes each group's units in its own ranking order (``problem.rankings``, from its criterion),
so an allocation decides kept *counts*: the units kept are always the problem's top-k. Every allocation
keeps at least one unit per group, removes at most ``max_ratio`` of any group, keeps counts the problem's
``round_to`` rounding leaves as they are, and never exceeds the budget (checked with exact costs). The
allocation scored is the problem's own projection of it (:meth:`Widths.settle`): with ``fill_budget`` (the
default) any budget the allocation leaves unused is handed back proportionally, as for every other agent,
so the policy the search leaves (its best allocation, an ``AllocationPolicy``) reproduces what was scored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agents.evaluator import BudgetedEvaluator
from agents.policies import RATIO_TOLERANCE
from agents.registry import register_agent
from prune_env.batches import iterate_batches
from prune_env.budget import check_reachable, keep_to_ratios
from prune_env.errors import InvalidSettingError, UnknownNameError
from prune_env.graph import units_to_keep
from prune_env.importance import get_importance, importance_names
from prune_env.problem import IMPORTANCE_BATCH_SIZE, PruningProblem
from prune_env.validation import as_int

NORMALIZERS = ("mean", "max", "model")


# ------------------------------------------------------------------------------------------------ widths


class Widths:
    """The kept counts each group of ``problem`` may take, and exact costs of allocations of them.

    ``choices[g]``: ascending counts from ``floor[g]`` to the group's units that the problem's rounding
    (``round_to``) maps to themselves and that remove at most ``max_ratio`` of the group — exactly, as an
    ``AllocationPolicy`` checks it: the projector's own floor rounds to the nearest count and may remove a
    little more (3 of 16 channels at 0.8), which no policy carried over could then be applied with.
    """

    def __init__(self, problem: PruningProblem) -> None:
        if problem.joint is not None:
            raise InvalidSettingError(
                "this problem's policies choose bits as well as channels (quantize=True or a BitOps / size "
                "budget); the allocation baselines decide kept channels for a MACs or parameter budget only, or a "
                "latency budget"
            )
        self.problem = problem
        self.target = float(problem.target)
        self.projector = problem.projector
        self.base = float(self.projector.base_cost)
        self.choices: list[np.ndarray] = []
        for units in problem.units.tolist():
            ks = np.arange(1, units + 1, dtype=np.int64)
            mapped = units_to_keep(
                np.full(units, units), keep_to_ratios(np.full(units, units), ks), problem.round_to
            )
            within = 1.0 - ks / units <= problem.max_ratio + RATIO_TOLERANCE
            self.choices.append(ks[(mapped == ks) & within])
        self.floor = np.array([c[0] for c in self.choices], dtype=np.int64)
        self.units = problem.units.copy()

    @property
    def n_groups(self) -> int:
        return len(self.choices)

    def check_reachable(self) -> None:
        """Refuse a budget below the smallest model these widths reach, naming that fraction (the problem
        refused one below its projector's floor when it was made; this floor can lie a little above)."""
        self.problem.check_target(self.target)
        check_reachable(self.projector.metric, self.target, self.cost(self.floor), self.problem.max_ratio)

    def cost(self, keep: np.ndarray) -> float:
        """The exact cost of ``keep`` as a fraction of the base model's (integer arithmetic, then one division)."""
        return self.projector.cost_ratio(np.asarray(keep, dtype=np.int64))

    def costs(self, keeps: np.ndarray) -> np.ndarray:
        """Costs of many keep vectors (rows) at once, in floating point: for ranking candidates only."""
        return self.projector.batch_cost_ratios(np.asarray(keeps))

    def fits(self, keep: np.ndarray) -> bool:
        return self.cost(keep) <= self.target

    def keep(self, index: np.ndarray) -> np.ndarray:
        """The kept counts of choice indices ``index`` (one per group)."""
        return np.array([c[i] for c, i in zip(self.choices, index, strict=True)], dtype=np.int64)

    def snap(self, group: int, count: int) -> int:
        """The largest allowed count of ``group`` at most ``count`` (its floor if ``count`` is below)."""
        c = self.choices[group]
        return int(c[max(int(np.searchsorted(c, count, side="right")) - 1, 0)])

    def settle(self, keep: np.ndarray) -> np.ndarray:
        """``keep`` as the problem's own projection returns it: ``keep_for(ratios_for(keep))`` applied
        until it changes nothing. A keep within the budget is only ever grown by it (``fill_budget``), so
        this stays within the budget and the allocation policy left behind reproduces it exactly."""
        keep = np.asarray(keep, dtype=np.int64)
        for _ in range(16):  # each pass only adds units and stops when none fits: a few passes at most
            settled = self.problem.keep_for(self.problem.ratios_for(keep))
            if np.array_equal(settled, keep):
                break
            keep = settled
        if not self.fits(keep) or np.any(keep < 1):
            raise RuntimeError(f"allocation {keep.tolist()} breaks the budget {self.target:g}")  # never
        return keep

    def step_down(self, index: np.ndarray, loss: Sequence[np.ndarray]) -> np.ndarray:
        """Greedy repair of an allocation over the budget: step one group down to its next allowed count
        where ``loss[g]`` (per choice) rises least per unit of exact cost saved, until the exact cost fits.
        Costs are those of the whole current allocation, so neighbouring groups' widths are accounted for."""
        index = np.array(index, dtype=np.int64)
        keep = self.keep(index)
        while not self.fits(keep):
            movable = np.flatnonzero(index > 0)
            if not movable.size:  # excluded by check_reachable: every floor fits
                raise RuntimeError("the narrowest allocation exceeds the budget")
            lower = np.array([self.choices[g][index[g] - 1] for g in movable.tolist()])
            candidates = np.repeat(keep[None, :], movable.size, axis=0)
            candidates[np.arange(movable.size), movable] = lower
            saved = self.cost(keep) - self.costs(candidates)
            lost = np.array([loss[g][index[g] - 1] - loss[g][index[g]] for g in movable.tolist()])
            rate = np.where(saved > 0, lost / np.where(saved > 0, saved, 1.0), np.inf)
            pick = movable[np.lexsort((movable, -saved, rate))[0]]  # least loss per cost, then most saved
            index[pick] -= 1
            keep[pick] = self.choices[pick][index[pick]]
        return index

    def step_up(self, index: np.ndarray, gain: Sequence[np.ndarray]) -> np.ndarray:
        """Greedy use of a budget left over: step one group up to its next allowed count where ``gain[g]``
        rises most per unit of exact cost added, among the steps that still fit, until none does."""
        index = np.array(index, dtype=np.int64)
        keep = self.keep(index)
        while True:
            movable = np.flatnonzero(index < np.array([len(c) - 1 for c in self.choices]))
            if not movable.size:
                return index
            higher = np.array([self.choices[g][index[g] + 1] for g in movable.tolist()])
            candidates = np.repeat(keep[None, :], movable.size, axis=0)
            candidates[np.arange(movable.size), movable] = higher
            added = self.costs(candidates) - self.cost(keep)
            won = np.array([gain[g][index[g] + 1] - gain[g][index[g]] for g in movable.tolist()])
            rate = np.where(added > 0, won / np.where(added > 0, added, 1.0), np.inf)
            for i in np.lexsort((movable, added, -rate)):  # most gain per cost first, then cheapest
                if self.fits(candidates[i]):  # the exact cost has the last word
                    index[movable[i]] += 1
                    keep = candidates[i]
                    break
            else:
                return index


# ------------------------------------------------------------------------------------------------ importance


def check_normalizer(owner: str, value: object) -> str:
    if not isinstance(value, str) or value not in NORMALIZERS:
        raise InvalidSettingError(
            f"{owner} normalizer must be one of {', '.join(repr(n) for n in NORMALIZERS)}, got {value!r}"
        )
    return value


def normalized(scores: Sequence[np.ndarray], normalizer: str, criterion: str) -> list[np.ndarray]:
    """Scores made scale-free: each group's divided by the group's mean (``"mean"``) or max (``"max"``)
    absolute score, or all divided by the mean over every unit of the model (``"model"``).

    Within-group normalisation is what global ranking wants, and the mean is Torch-Pruning's default for
    it: a group's raw score sums every coupled slice (a residual channel's many convolutions), so raw
    scores rank whole groups before single units, while mean-normalised ones say how a unit compares
    with its group's average — and, unlike the max, one outlier unit does not shrink the rest of its
    group. The knapsack wants the opposite: normalised within groups, every group's total value is its
    unit count, and the knapsack then just prunes the groups dearest per unit — a residual stream, which
    is what a network can least spare. HALP's saliency is summed over coupled layers and compared across
    the whole network; ``"model"`` keeps those cross-group magnitudes and only fixes the scale. A group
    (or model) whose scores are all zero ranks its units equally (each scores 1).
    """
    checked = []
    for g, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise InvalidSettingError(
                f"importance {criterion!r} gave NaN or inf scores for group {g}; use another criterion"
            )
        checked.append(s)
    whole = float(np.abs(np.concatenate(checked)).mean())
    out = []
    for s in checked:
        if normalizer == "model":
            scale = whole
        else:
            scale = float(np.abs(s).mean() if normalizer == "mean" else np.abs(s).max())
        out.append(s / scale if scale > 0 else np.ones_like(s))
    return out


def criterion_scores(problem: PruningProblem, criterion: str | None) -> list[np.ndarray]:
    """Per-unit scores of every group of the base model under ``criterion`` (``None``: the problem's own,
    computed when the problem was made). Data-driven criteria read the same seeded training batches the
    problem's ranking reads — never validation or test data."""
    if criterion is None or criterion == problem.settings.importance:
        return [s.copy() for s in problem.importance_scores]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(problem.seed)
        return iterate_batches(problem.data.train, IMPORTANCE_BATCH_SIZE, shuffle=True, generator=generator)

    score = get_importance(criterion, problem.seed, batches=batches)
    return [np.array(score(g, problem.base_model), dtype=np.float64) for g in problem.graph.groups]


# ------------------------------------------------------------------------------------------------ global


@dataclass(frozen=True)
class GlobalSettings:
    """Settings of :func:`global_ranking`.

    ``criteria``: importance criteria (names of :func:`prune_env.importance.importance_names`) ranking
    units across groups, each tried once (one evaluation each); empty: the problem's own criterion.
    A single name is taken as a one-name tuple. ``normalizer``: ``"mean"`` (Torch-Pruning's default),
    ``"max"`` or ``"model"`` (see :func:`normalized`).
    """

    criteria: tuple[str, ...] = ()
    normalizer: str = "mean"

    def __post_init__(self) -> None:
        criteria = (self.criteria,) if isinstance(self.criteria, str) else self.criteria
        if not isinstance(criteria, (tuple, list)) or not all(isinstance(c, str) for c in criteria):
            raise InvalidSettingError(
                f"global criteria must be a tuple of importance names, got {self.criteria!r}"
            )
        unknown = [c for c in criteria if c not in importance_names()]
        if unknown:
            raise UnknownNameError(
                f"global criteria: unknown importance {unknown[0]!r}; choose among {', '.join(importance_names())}"
            )
        if len(set(criteria)) != len(criteria):
            raise InvalidSettingError(
                f"global criteria name a criterion twice: {list(criteria)}; name each once"
            )
        object.__setattr__(self, "criteria", tuple(criteria))
        check_normalizer("global", self.normalizer)


def global_keep(widths: Widths, scores: Sequence[np.ndarray]) -> np.ndarray:
    """Kept counts after removing units in ascending (normalised) ``scores`` across all groups, as few as
    meet the budget: the threshold — how many units of the global order go — found by bisection on exact
    costs. Each group keeps at least its floor and an allowed count (the largest at most what the
    threshold leaves), so the cost falls as the threshold rises and the bisection is exact."""
    group = np.concatenate([np.full(len(s), g) for g, s in enumerate(scores)])
    position = np.concatenate([np.arange(len(s)) for s in scores])
    order = np.lexsort((position, group, np.concatenate(scores)))  # ties broken by group, then unit

    def keep_after(removed: int) -> np.ndarray:
        gone = np.bincount(group[order[:removed]], minlength=widths.n_groups)
        return np.array(
            [widths.snap(g, int(u - r)) for g, (u, r) in enumerate(zip(widths.units, gone, strict=True))]
        )

    lo, hi = 0, len(order)  # keep_after(hi) is every floor, which fits (check_reachable)
    if widths.fits(keep_after(lo)):
        return keep_after(lo)
    while hi - lo > 1:  # invariant: keep_after(lo) exceeds the budget, keep_after(hi) fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if widths.fits(keep_after(mid)) else (mid, hi)
    return keep_after(hi)


@register_agent("global", GlobalSettings)
def global_ranking(evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: GlobalSettings) -> None:
    """Global channel ranking (Torch-Pruning's global pruning), one evaluation per criterion.

    Units of every group are ranked together by importance normalised within their group (see
    :func:`normalized`) and removed in ascending order until the budget is met exactly
    (:func:`global_keep`). With a criterion other than the problem's, the global ranking decides how many
    units each group keeps; the units kept are the problem's ranking's top-k. Deterministic: the rest of
    the budget is left unused. The search's policy is the best allocation evaluated.
    """
    widths = Widths(evaluator.problem)
    widths.check_reachable()
    criteria: Sequence[str | None] = settings.criteria or (None,)
    if evaluator.remaining < len(criteria):
        raise InvalidSettingError(
            f"global tries {len(criteria)} criteria, one evaluation each, but the search has "
            f"{evaluator.remaining}: give a budget of at least {len(criteria)} evaluations (budget_evals, "
            "--evals), or fewer criteria"
        )
    keeps = []
    for criterion in criteria:  # every allocation is decided before the first evaluation
        label = criterion or str(evaluator.problem.settings.importance)
        scores = normalized(criterion_scores(evaluator.problem, criterion), settings.normalizer, label)
        keeps.append(widths.settle(global_keep(widths, scores)))
    for keep in keeps:
        evaluator.evaluate_keep(keep)


# ------------------------------------------------------------------------------------------------ knapsack


def solve_multiple_choice_knapsack(
    values: Sequence[Sequence[float] | np.ndarray],
    weights: Sequence[Sequence[float] | np.ndarray],
    capacity: float,
    resolution: int = 4096,
) -> list[int] | None:
    """The multiple-choice knapsack: one option per group, total weight within ``capacity``, most value.

    Exact dynamic programming over ``resolution`` cost buckets of ``capacity / resolution``: each weight
    is rounded *up* to whole buckets, so the chosen options never exceed ``capacity`` (they may leave up to
    a bucket per group unused); with weights that are multiples of the bucket the answer is optimal.
    Returns the chosen option index of each group, or ``None`` if no choice fits. Ties go to the earlier
    option. Time ``O(resolution × options)``, memory ``O(resolution × groups)``.
    """
    resolution = as_int("resolution", resolution)
    if resolution < 1:
        raise InvalidSettingError(f"resolution must be an integer >= 1, got {resolution}")
    if len(values) != len(weights) or not len(values):
        raise InvalidSettingError("values and weights must list the same groups, at least one")
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    wts = [np.asarray(w, dtype=np.float64) for w in weights]
    for g, (v, w) in enumerate(zip(vals, wts, strict=True)):
        if v.ndim != 1 or v.shape != w.shape or not v.size:
            raise InvalidSettingError(f"group {g}: give one value and one weight per option, at least one")
        if not (np.all(np.isfinite(v)) and np.all(np.isfinite(w)) and np.all(w >= 0)):
            raise InvalidSettingError(f"group {g}: values must be finite and weights finite and >= 0")
    if not (np.isfinite(capacity) and capacity >= 0):
        raise InvalidSettingError(f"capacity must be a finite number >= 0, got {capacity!r}")
    bucket = capacity / resolution if capacity > 0 else 1.0
    best = np.zeros(resolution + 1)  # best value of the groups so far within b buckets
    picks = []
    for v, w in zip(vals, wts, strict=True):
        need = np.ceil(w / bucket).astype(np.int64)
        new = np.full(resolution + 1, -np.inf)
        pick = np.full(resolution + 1, -1, dtype=np.int64)
        for j in range(len(v)):
            n = int(need[j])
            if n > resolution:
                continue
            candidate = best[: resolution + 1 - n] + v[j]
            better = candidate > new[n:]
            new[n:][better] = candidate[better]
            pick[n:][better] = j
        best = new
        picks.append((pick, need))
    if not np.isfinite(best[resolution]):
        return None
    chosen, b = [], resolution
    for pick, need in reversed(picks):
        j = int(pick[b])
        chosen.append(j)
        b -= int(need[j])
    return chosen[::-1]


@dataclass(frozen=True)
class KnapsackSettings:
    """Settings of :func:`knapsack`.

    ``resolution``: cost buckets of the dynamic programme (weights rounded up to them, so the solution is
    never over budget in the knapsack's cost model; what a coarse one leaves unused is filled by the
    greedy repair). ``rounds``: how many times the cost model is re-linearised, around the previous
    solution (the first around the uniform one); the allocation of most value is kept. ``normalizer``:
    ``"model"`` (HALP's network-wide saliency, scale-free; see :func:`normalized` for why not within
    groups), ``"mean"`` or ``"max"``.
    """

    resolution: int = 4096
    rounds: int = 2
    normalizer: str = "model"

    def __post_init__(self) -> None:
        for name, low in (("resolution", 1), ("rounds", 1)):
            value = as_int(f"knapsack {name}", getattr(self, name))
            if value < low:
                raise InvalidSettingError(f"knapsack {name} must be an integer >= {low}, got {value}")
        check_normalizer("knapsack", self.normalizer)


def linearised(widths: Widths, point: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Knapsack weights (per group, per allowed count) and capacity of the cost expanded around ``point``.

    Costs are not additive over groups: a convolution's MACs are its input group's kept count times its
    output group's. Around an allocation ``point`` the cost is ``cost(point) + Σ_g Δ_g(k_g)`` up to the
    cross terms, where ``Δ_g(k)`` is the exact change when group g alone keeps ``k`` (its neighbours at
    their widths in ``point``) — exact for one group moved, and close near ``point``, which is why the
    first expansion is around the uniform allocation (at the budget, where the answer lies) rather than
    the full model (whose neighbours' full widths make every group look dearer than it is). Weights are
    shifted so each group's floor weighs 0. The exact cost of the answer is checked and repaired after.
    """
    base_cost = widths.cost(point)
    weights, spent = [], 0.0
    for g, ks in enumerate(widths.choices):
        # Exact when group g alone moves: the cost model's quadratic, or for a latency budget the table's
        # predictions of each of the group's widths (batched); not monotone there, hence the clip below.
        delta = widths.projector.along_group(point, g, ks) / widths.base - base_cost
        weights.append(np.maximum(delta - delta[0], 0.0))
        spent += float(delta[0])
    return weights, widths.target - base_cost - spent


def knapsack_keep(widths: Widths, values: Sequence[np.ndarray], settings: KnapsackSettings) -> np.ndarray:
    """HALP's allocation: the knapsack of ``values`` (per group, per allowed count) under the budget,
    linearised (:func:`linearised`), then repaired with exact costs — greedy steps down where the least
    value is lost per cost saved while over the budget, then up where the most is gained per cost added
    while a step still fits."""
    point = widths.problem.uniform_keep()
    best: tuple[float, np.ndarray] | None = None
    for _ in range(settings.rounds):
        weights, capacity = linearised(widths, point)
        chosen = (
            None
            if capacity < 0
            else solve_multiple_choice_knapsack(values, weights, capacity, settings.resolution)
        )
        index = np.zeros(widths.n_groups, dtype=np.int64) if chosen is None else np.array(chosen)
        index = widths.step_up(widths.step_down(index, [-v for v in values]), values)
        total = float(sum(v[i] for v, i in zip(values, index, strict=True)))
        keep = widths.keep(index)
        if best is None or total > best[0]:
            best = (total, keep)
        if np.array_equal(keep, point):
            break
        point = keep
    assert best is not None
    return best[1]


@register_agent("knapsack", KnapsackSettings)
def knapsack(evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: KnapsackSettings) -> None:
    """HALP's latency-saliency knapsack with the budget's cost as the latency: the latency table's
    predictions for a latency budget (HALP's own), the MACs or parameters otherwise.

    A group keeping k units is worth the sum of the importance (the problem's criterion, normalised by
    :func:`normalized`) of the k units it keeps — its ranking's top-k — and weighs its share of the cost
    (:func:`linearised`); the most valuable allocation within the budget is solved exactly in the
    discretised, linearised cost model and repaired to the exact cost (:func:`knapsack_keep`). One
    evaluation; the rest of the budget is left unused.
    """
    problem = evaluator.problem
    widths = Widths(problem)
    widths.check_reachable()
    scores = normalized(
        criterion_scores(problem, None), settings.normalizer, str(problem.settings.importance)
    )
    values = []
    for s, order, ks in zip(scores, problem.rankings, widths.choices, strict=True):
        kept = np.concatenate([[0.0], np.cumsum(s[order])])  # importance of the top-k units, k = 0..units
        values.append(kept[ks])
    evaluator.evaluate_keep(widths.settle(knapsack_keep(widths, values, settings)))


__all__ = [
    "NORMALIZERS",
    "GlobalSettings",
    "KnapsackSettings",
    "Widths",
    "criterion_scores",
    "global_keep",
    "global_ranking",
    "knapsack",
    "knapsack_keep",
    "linearised",
    "normalized",
    "solve_multiple_choice_knapsack",
]
