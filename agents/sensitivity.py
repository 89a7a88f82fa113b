"""Per-layer sensitivity analysis as an allocation baseline (Li et al. 2017, "Pruning Filters for
Efficient ConvNets"; NetAdapt's per-layer step).

Each group is pruned alone at a few ratios and scored by the proxy; a greedy allocation then prunes, a step
of units at a time, where the accuracy lost per unit of cost saved — interpolated from the measured curve —
is least, until the budget is met, and that allocation is scored. Evaluations: groups × ratios (max_ratio
included) + 1, less sweep points that coincide (each distinct policy is scored once); a smaller budget is
refused before any evaluation, a larger one is left unused (the search is deterministic).

Where a group is measured: Li et al. prune one layer of the *full* model, but every evaluation here is
within the budget (the evaluator projects a policy over it onto it and never counts one that exceeds it),
and the full model with one group pruned is over any budget that matters. So every group is measured
against one common, budget-feasible context: the other groups at the smallest uniform ratio at which each
group, alone at its least-pruned sweep ratio, fits the budget (:func:`plan_sweep`). Along a group's curve
only that group changes, and every curve shares the context, so their slopes compare across groups. A
group too large to fit at that ratio even with every other group at its floor is measured from the widest
count that fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agents.allocation import Widths
from agents.evaluator import BudgetedEvaluator
from agents.policies import RATIO_TOLERANCE
from agents.registry import register_agent
from prune_env.errors import InvalidSettingError
from prune_env.graph import unit_count_to_keep
from prune_env.validation import as_real

MEASURES = ("accuracy", "loss")


@dataclass(frozen=True)
class SensitivitySettings:
    """Settings of :func:`sensitivity`.

    ``ratios``: fractions of a group's units removed in the sweep, each in (0, 1) and at most the
    problem's ``max_ratio``; ``max_ratio`` itself is always measured too (the curve's end). ``measure``:
    ``"accuracy"`` (Li et al.'s) or ``"loss"`` (the proxy's cross-entropy, finer-grained on a small
    validation sample) as what pruning loses.
    """

    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    measure: str = "accuracy"

    def __post_init__(self) -> None:
        if (
            isinstance(self.ratios, (str, bytes))
            or not isinstance(self.ratios, (tuple, list))
            or not self.ratios
        ):
            raise InvalidSettingError(
                f"sensitivity ratios must be a non-empty tuple of fractions, got {self.ratios!r}"
            )
        ratios = tuple(as_real(f"sensitivity ratios[{i}]", r) for i, r in enumerate(self.ratios))
        bad = [r for r in ratios if not 0.0 < r < 1.0]
        if bad:
            raise InvalidSettingError(f"sensitivity ratios must lie in (0, 1), got {bad[0]!r}")
        object.__setattr__(self, "ratios", ratios)
        if not isinstance(self.measure, str) or self.measure not in MEASURES:
            raise InvalidSettingError(
                f"sensitivity measure must be one of {', '.join(repr(m) for m in MEASURES)}, got {self.measure!r}"
            )


@dataclass(frozen=True)
class Sweep:
    """The policies a sensitivity analysis scores.

    ``ratios``: the sweep's ratios, ascending, ``max_ratio`` last; ``context``: the kept counts of the other
    groups while one is measured; ``points[g]``: the kept counts group g is measured at (widest first);
    ``keeps``: the distinct policies to score, in order.
    """

    ratios: tuple[float, ...]
    context: np.ndarray
    points: list[np.ndarray]
    keeps: list[np.ndarray]

    @property
    def needed(self) -> int:
        """Evaluations the analysis spends: every distinct sweep point and the final allocation."""
        return len(self.keeps) + 1

    def at(self, group: int, count: int) -> np.ndarray:
        keep = self.context.copy()
        keep[group] = count
        return keep


def plan_sweep(widths: Widths, ratios: Sequence[float]) -> Sweep:
    """The sweep of ``ratios`` (and ``max_ratio``) for every group against the common context.

    The context is the problem's uniform rule at the smallest ratio ρ (found by bisection on exact costs)
    at which every group g, at its widest sweep count ``cap[g]`` with the others at ρ, fits the budget;
    ``cap[g]`` is the least-pruned sweep ratio's count, narrowed to the widest that fits with every other
    group at its floor when even that does not. At ρ = ``max_ratio`` the context is every floor, which fits
    with each cap, so the bisection always ends. Every sweep point then fits: a group's count never exceeds
    its cap, and costs rise with kept counts.
    """
    problem = widths.problem
    over = [r for r in ratios if r > problem.max_ratio + RATIO_TOLERANCE]
    if over:
        raise InvalidSettingError(
            f"sensitivity ratio {over[0]:g} removes more than this problem's max_ratio {problem.max_ratio:g}: "
            "give ratios up to max_ratio (max_ratio itself is always measured)"
        )
    below = sorted({float(r) for r in ratios if r < problem.max_ratio - RATIO_TOLERANCE})
    sweep = (*below, float(problem.max_ratio))
    units, round_to, n = widths.units.tolist(), problem.round_to, widths.n_groups
    wanted = [[widths.snap(g, unit_count_to_keep(units[g], r, round_to)) for r in sweep] for g in range(n)]

    cap = []
    for g in range(n):
        ks = widths.choices[g][widths.choices[g] <= wanted[g][0]][::-1]  # widest first
        rows = np.repeat(widths.floor[None, :], len(ks), axis=0)
        rows[:, g] = ks
        cheap = np.flatnonzero(widths.costs(rows) <= widths.target * (1 + 1e-9))  # floating-point shortlist
        cap.append(next((int(ks[i]) for i in cheap if widths.fits(rows[i])), int(widths.floor[g])))

    def context(ratio: float) -> np.ndarray:
        return np.array([widths.snap(g, unit_count_to_keep(units[g], ratio, round_to)) for g in range(n)])

    def fits_all(ctx: np.ndarray) -> bool:
        return all(widths.fits(np.where(np.arange(n) == g, cap[g], ctx)) for g in range(n))

    lo, hi = 0.0, float(problem.max_ratio)
    if fits_all(context(lo)):
        hi = lo
    for _ in range(40):  # context(hi) always fits; 40 halvings resolve ρ far below one unit of any group
        if hi - lo <= 1e-12:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits_all(context(mid)) else (mid, hi)
    base = Sweep(sweep, context(hi), [], [])
    points = [np.array(sorted({min(cap[g], k) for k in wanted[g]}, reverse=True)) for g in range(n)]
    keeps: dict[tuple[int, ...], np.ndarray] = {}
    for g in range(n):
        for k in points[g]:
            keep = base.at(g, int(k))
            keeps.setdefault(tuple(keep.tolist()), keep)
    return Sweep(sweep, base.context, points, list(keeps.values()))


def loss_tables(widths: Widths, sweep: Sweep, measured: dict[tuple[int, ...], float]) -> list[np.ndarray]:
    """Per group, the loss at each allowed count, from its measured curve (``measured``: the score of
    every sweep policy, higher is better).

    The loss at a measured count is the drop from the group's widest measured count, made monotone (a
    narrower count never loses less: a proxy's noise is not read as pruning helping); between measured
    counts it is interpolated linearly, and above the widest it continues the first segment's slope (no
    curve measures the full width, which is over the budget). A group measured at one count only is flat.
    """
    tables = []
    for g, ks in enumerate(sweep.points):
        scores = np.array([measured[tuple(sweep.at(g, int(k)).tolist())] for k in ks])
        drop = np.maximum.accumulate(scores[0] - scores)  # ks run widest first
        slope = float((drop[1] - drop[0]) / (ks[0] - ks[1])) if len(ks) > 1 else 0.0
        c = widths.choices[g]
        table = np.interp(c, ks[::-1], drop[::-1])
        above = c > ks[0]
        table[above] = -slope * (c[above] - ks[0])
        tables.append(table)
    return tables


@register_agent("sensitivity", SensitivitySettings)
def sensitivity(
    evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: SensitivitySettings
) -> None:
    """Per-layer sensitivity analysis, then a greedy allocation from it (see the module's docstring).

    The sweep (:func:`plan_sweep`) is scored in one batch; the greedy starts from the full model and
    steps one group down to its next allowed count where the interpolated loss (:func:`loss_tables`) rises
    least per unit of exact cost saved — the whole allocation's cost, so neighbouring groups' widths count
    — until the budget is met; that allocation, as the problem projects it, is the last evaluation. The
    search's policy is the best allocation evaluated, a sweep point if one scored best (which, applied by
    the problem's projection with ``fill_budget``, grows to spend the budget the sweep point left).
    """
    widths = Widths(evaluator.problem)
    widths.check_reachable()
    sweep = plan_sweep(widths, settings.ratios)
    if evaluator.remaining < sweep.needed:
        coincide = widths.n_groups * len(sweep.ratios) - len(sweep.keeps)
        raise InvalidSettingError(
            f"sensitivity needs {sweep.needed} evaluations: {len(sweep.keeps)} sweep points ({widths.n_groups} "
            f"groups × {len(sweep.ratios)} ratios {', '.join(f'{r:g}' for r in sweep.ratios)}"
            + (f", less {coincide} that coincide" if coincide else "")
            + f") and 1 for the allocation, but the search has {evaluator.remaining}: give a budget of at least "
            f"{sweep.needed} evaluations (budget_evals, --evals), or fewer ratios"
        )
    results = evaluator.evaluate_keeps(sweep.keeps)
    measured = {
        tuple(keep.tolist()): (outcome.accuracy if settings.measure == "accuracy" else -outcome.loss)
        for keep, (outcome, _) in zip(sweep.keeps, results, strict=True)
    }
    full = np.array([len(c) - 1 for c in widths.choices])
    index = widths.step_down(full, loss_tables(widths, sweep, measured))
    evaluator.evaluate_keep(widths.settle(widths.keep(index)))


__all__ = ["MEASURES", "SensitivitySettings", "Sweep", "loss_tables", "plan_sweep", "sensitivity"]
