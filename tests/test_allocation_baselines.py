"""The non-learned allocation baselines: global ranking, HALP's knapsack and per-layer sensitivity.

Each meets the budget in the problem's metric without exceeding it (exact costs), never empties a group,
spends the evaluations it says, refuses what it cannot do before evaluating anything, and runs through
``agents.search`` and the benchmark harness.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from quick import QUICK_SCORING
from torch import nn

from agents import BudgetedEvaluator, ResumeDivergedWarning, available, run_agent, search
from agents.allocation import (
    GlobalSettings,
    KnapsackSettings,
    Widths,
    criterion_scores,
    global_keep,
    knapsack_keep,
    linearised,
    normalized,
    solve_multiple_choice_knapsack,
)
from agents.policies import RATIO_TOLERANCE, AllocationPolicy
from agents.sensitivity import SensitivitySettings, plan_sweep
from prune_env.errors import InvalidSettingError, UnknownNameError
from prune_env.problem import PruningProblem

NAMES = ("global", "knapsack", "sensitivity")
ENOUGH = 60  # evaluations: more than a sensitivity analysis of resnet20 needs (45 with its default ratios)


@pytest.fixture(scope="module")
def macs(untrained_resnet20: nn.Module, digits: Any) -> PruningProblem:
    return PruningProblem(untrained_resnet20, digits, target_macs=0.5, **QUICK_SCORING)


@pytest.fixture(scope="module")
def params(untrained_resnet20: nn.Module, digits: Any) -> PruningProblem:
    return PruningProblem(untrained_resnet20, digits, target_params=0.4, **QUICK_SCORING)


@pytest.fixture(scope="module")
def rounded(untrained_resnet20: nn.Module, digits: Any) -> PruningProblem:
    return PruningProblem(
        untrained_resnet20, digits, target_macs=0.3, round_to=4, max_ratio=0.75, **QUICK_SCORING
    )


def _valid(problem: PruningProblem, keep: Any) -> None:
    """Within the budget (exact integer costs), no group empty, none pruned beyond max_ratio, and counts
    the problem's rounding leaves as they are."""
    keep = np.asarray(keep, dtype=np.int64)
    assert problem.projector.cost_ratio(keep) <= problem.target
    assert np.all((keep >= 1) & (keep <= problem.units))
    assert np.all(problem.ratios_for(keep) <= problem.max_ratio + RATIO_TOLERANCE)
    np.testing.assert_array_equal(problem.unprojected_keep(problem.ratios_for(keep)), keep)


def test_registered() -> None:
    assert set(NAMES) <= set(available())


@pytest.mark.parametrize("fixture", ["macs", "params", "rounded"])
@pytest.mark.parametrize("name", NAMES)
def test_meets_the_budget_and_never_exceeds_it(
    request: pytest.FixtureRequest, fixture: str, name: str
) -> None:
    problem: PruningProblem = request.getfixturevalue(fixture)
    result = search(name, problem, ENOUGH, seed=0)
    for e in result.history:
        _valid(problem, e.keep)
    final = np.array(result.history[-1].keep)  # every agent's last evaluation is its allocation
    assert problem.projector.cost_ratio(final) >= 0.95 * problem.target  # the budget is spent
    assert result.best_reward == max(e.reward for e in result.history)


def test_global_is_one_deterministic_evaluation_that_is_not_uniform(macs: PruningProblem) -> None:
    first, second = (search("global", macs, 5, seed=s) for s in (0, 1))
    assert len(first.history) == len(second.history) == 1  # the spare budget is left unused
    assert first.history[0].keep == second.history[0].keep
    assert first.history[0].reward == second.history[0].reward
    assert not np.array_equal(first.best_keep, macs.uniform_keep())


def test_global_threshold_is_the_first_that_fits(macs: PruningProblem, params: PruningProblem) -> None:
    """The bisection finds the fewest units of the global order whose removal meets the budget, which a
    scan over every threshold confirms; removing one unit fewer would exceed it."""
    for problem in (macs, params):
        widths = Widths(problem)
        scores = normalized(problem.importance_scores, "mean", "l1")
        keep = global_keep(widths, scores)
        group = np.concatenate([np.full(len(s), g) for g, s in enumerate(scores)])
        order = np.lexsort(
            (np.concatenate([np.arange(len(s)) for s in scores]), group, np.concatenate(scores))
        )
        for removed in range(len(order) + 1):
            gone = np.bincount(group[order[:removed]], minlength=problem.n_groups)
            scanned = np.array(
                [widths.snap(g, int(u - r)) for g, (u, r) in enumerate(zip(problem.units, gone, strict=True))]
            )
            if widths.fits(scanned):
                break
        np.testing.assert_array_equal(keep, scanned)
        _valid(problem, keep)


def test_normalisation() -> None:
    scores = [np.array([1.0, 3.0]), np.array([10.0, 20.0, 30.0]), np.zeros(2)]
    mean = normalized(scores, "mean", "x")
    assert [float(s.mean()) for s in mean] == pytest.approx([1.0, 1.0, 1.0])
    assert [float(s.max()) for s in normalized(scores, "max", "x")] == pytest.approx([1.0, 1.0, 1.0])
    model = normalized(scores, "model", "x")
    assert float(np.concatenate(model).mean()) == pytest.approx(1.0)
    assert model[1][0] / model[0][0] == pytest.approx(10.0)  # cross-group magnitudes kept
    with pytest.raises(InvalidSettingError, match="NaN or inf"):
        normalized([np.array([1.0, np.nan])], "mean", "x")


def test_global_tries_each_criterion_once(macs: PruningProblem) -> None:
    result = search("global", macs, 5, criteria=("l1", "fpgm", "taylor"))
    assert len(result.history) == 3
    assert len({e.keep for e in result.history}) > 1  # the criteria disagree on how many units to keep
    # The problem's own criterion is its ranking's scores; another is computed on the base model.
    np.testing.assert_array_equal(criterion_scores(macs, "l1")[0], macs.importance_scores[0])
    np.testing.assert_array_equal(np.argsort(-macs.importance_scores[3], kind="stable"), macs.rankings[3])
    evaluator = BudgetedEvaluator(macs, 2)
    with pytest.raises(InvalidSettingError, match=r"3 criteria, one evaluation each.*at least 3 evaluations"):
        run_agent("global", evaluator, criteria=("l1", "l2", "fpgm"))
    assert evaluator.used == 0
    assert GlobalSettings(criteria="l2").criteria == ("l2",)  # --agent-setting criteria=l2
    assert GlobalSettings(criteria=["l1", "l2"]).criteria == ("l1", "l2")  # criteria='["l1", "l2"]'
    with pytest.raises(UnknownNameError, match="unknown importance 'l3'"):
        GlobalSettings(criteria=("l3",))
    with pytest.raises(InvalidSettingError, match="twice"):
        GlobalSettings(criteria=("l1", "l1"))
    with pytest.raises(InvalidSettingError, match="normalizer"):
        GlobalSettings(normalizer="median")


def test_sensitivity_spends_groups_times_ratios_plus_one(macs: PruningProblem) -> None:
    sweep = plan_sweep(Widths(macs), (0.25, 0.5))
    assert sweep.ratios == (0.25, 0.5, macs.max_ratio)
    assert sweep.needed == macs.n_groups * 3 + 1  # no two sweep points coincide here
    for keep in sweep.keeps:  # each group alone against the common context, within the budget
        assert np.count_nonzero(keep != sweep.context) == 1
        _valid(macs, keep)
    result = search("sensitivity", macs, ENOUGH, ratios=(0.25, 0.5))
    assert len(result.history) == sweep.needed
    assert [e.keep for e in result.history[:-1]] == [tuple(k.tolist()) for k in sweep.keeps]


def test_sensitivity_refuses_a_small_budget_before_evaluating(macs: PruningProblem) -> None:
    needed = plan_sweep(Widths(macs), SensitivitySettings().ratios).needed
    # 16-channel groups at 0.75 and at max_ratio 0.8 both keep 4 channels: measured once.
    assert needed == 12 * 4 + 1 - 4
    evaluator = BudgetedEvaluator(macs, needed - 1)
    before = macs.evaluations
    with pytest.raises(
        InvalidSettingError, match=rf"sensitivity needs {needed} evaluations.*less 4 that coincide"
    ):
        run_agent("sensitivity", evaluator)
    assert evaluator.used == 0 and macs.evaluations == before
    with pytest.raises(InvalidSettingError, match="more than this problem's max_ratio"):
        search("sensitivity", macs, ENOUGH, ratios=(0.5, 0.9))
    with pytest.raises(InvalidSettingError, match=r"in \(0, 1\)"):
        SensitivitySettings(ratios=(0.0, 0.5))
    with pytest.raises(InvalidSettingError, match="measure"):
        SensitivitySettings(measure="reward")


def test_sensitivity_resumes_where_it_stopped(macs: PruningProblem) -> None:
    """Deterministic, so an interrupted analysis replays its log and ends as the uninterrupted one."""
    uninterrupted = search("sensitivity", macs, ENOUGH, ratios=(0.5,)).history

    def stop(entry: Any) -> None:
        if entry.index == 2:
            raise KeyboardInterrupt

    evaluator = BudgetedEvaluator(macs, ENOUGH, on_evaluation=stop)
    with pytest.raises(KeyboardInterrupt):
        run_agent("sensitivity", evaluator, ratios=(0.5,))
    resumed = BudgetedEvaluator(macs, ENOUGH)
    resumed.replay(list(evaluator.history))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeDivergedWarning)
        history = run_agent("sensitivity", resumed, ratios=(0.5,)).history
    assert [(e.keep, e.reward) for e in history] == [(e.keep, e.reward) for e in uninterrupted]


def _brute_force(values: list[np.ndarray], weights: list[np.ndarray], capacity: float) -> float | None:
    best = None
    for choice in itertools.product(*(range(len(v)) for v in values)):
        if sum(w[j] for w, j in zip(weights, choice, strict=True)) <= capacity:
            value = sum(v[j] for v, j in zip(values, choice, strict=True))
            best = value if best is None else max(best, value)
    return best


def test_knapsack_solver_is_optimal_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        groups = int(rng.integers(1, 5))
        values = [rng.uniform(0, 10, int(rng.integers(1, 5))) for _ in range(groups)]
        weights = [rng.integers(0, 12, len(v)).astype(float) for v in values]
        capacity = int(rng.integers(0, 25))
        chosen = solve_multiple_choice_knapsack(values, weights, capacity, resolution=max(capacity, 1))
        expected = _brute_force(values, weights, capacity)
        if expected is None:
            assert chosen is None
            continue
        assert chosen is not None
        assert sum(w[j] for w, j in zip(weights, chosen, strict=True)) <= capacity
        assert sum(v[j] for v, j in zip(values, chosen, strict=True)) == pytest.approx(expected)
    # Weights off the bucket grid are rounded up: never over capacity, optimal on the coarse grid.
    chosen = solve_multiple_choice_knapsack([[0.0, 5.0], [0.0, 4.0]], [[0.0, 0.6], [0.0, 0.5]], 1.0, 2)
    assert chosen == [1, 0]  # 0.6 + 0.5 > 1: only one of them fits
    assert solve_multiple_choice_knapsack([[1.0]], [[2.0]], 1.0) is None
    with pytest.raises(InvalidSettingError, match="one value and one weight per option"):
        solve_multiple_choice_knapsack([[1.0, 2.0]], [[1.0]], 1.0)
    with pytest.raises(InvalidSettingError, match="weights finite and >= 0"):
        solve_multiple_choice_knapsack([[1.0]], [[-1.0]], 1.0)


def test_knapsack_cost_model_and_repair(macs: PruningProblem, params: PruningProblem) -> None:
    """The linearised cost is exact when one group moves from the expansion point; the allocation,
    repaired with exact costs, fits and has no single step up left that would still fit."""
    for problem in (macs, params):
        widths = Widths(problem)
        point = widths.floor.copy()
        point[::2] = problem.units[::2]
        weights, capacity = linearised(widths, point)
        for g in (0, 5, problem.n_groups - 1):
            for j in (0, len(widths.choices[g]) // 2):
                moved = point.copy()
                moved[g] = widths.choices[g][j]
                rest = sum(
                    float(weights[h][np.searchsorted(widths.choices[h], point[h])])
                    for h in range(problem.n_groups)
                    if h != g
                )
                predicted = problem.target - capacity + weights[g][j] + rest
                assert predicted == pytest.approx(widths.cost(moved), rel=1e-9)
        scores = normalized(problem.importance_scores, "model", "l1")
        values = [
            np.concatenate([[0.0], np.cumsum(s[o])])[c]
            for s, o, c in zip(scores, problem.rankings, widths.choices, strict=True)
        ]
        keep = knapsack_keep(widths, values, KnapsackSettings(resolution=64))
        _valid(problem, keep)
        for g in range(problem.n_groups):
            j = int(np.searchsorted(widths.choices[g], keep[g]))
            if j + 1 < len(widths.choices[g]):
                up = keep.copy()
                up[g] = widths.choices[g][j + 1]
                assert not widths.fits(up)
    with pytest.raises(InvalidSettingError, match="resolution must be an integer >= 1"):
        KnapsackSettings(resolution=0)


@pytest.mark.parametrize("name", NAMES)
def test_unreachable_budget_refused_before_any_evaluation(
    untrained_resnet20: nn.Module, digits: Any, name: str
) -> None:
    """A target the projector reaches only by rounding 16 channels down to 3 (more than max_ratio 0.8)
    is out of reach for an allocation that respects max_ratio; the smallest reachable fraction is named."""
    probe = PruningProblem(untrained_resnet20, digits, target_macs=0.5, **QUICK_SCORING)
    floor = Widths(probe).cost(Widths(probe).floor)
    assert probe.projector.min_cost_ratio < floor
    target = (probe.projector.min_cost_ratio + floor) / 2
    problem = PruningProblem(untrained_resnet20, digits, target_macs=target, **QUICK_SCORING)
    evaluator = BudgetedEvaluator(problem, ENOUGH)
    before = problem.evaluations
    with pytest.raises(InvalidSettingError, match=rf"impossible.*still leaves {floor:.4g}"):
        run_agent(name, evaluator)
    assert evaluator.used == 0 and problem.evaluations == before


def test_joint_problems_refused(untrained_resnet20: nn.Module, digits: Any) -> None:
    problem = PruningProblem(untrained_resnet20, digits, target_macs=0.5, quantize=True, **QUICK_SCORING)
    for name in NAMES:
        with pytest.raises(InvalidSettingError, match="proposes kept channels alone"):
            search(name, problem, ENOUGH)
    with pytest.raises(InvalidSettingError, match="MACs or parameter budget only"):
        Widths(problem)


@pytest.mark.parametrize("name", NAMES)
def test_policy_is_the_best_allocation(macs: PruningProblem, name: str, tmp_path: Path) -> None:
    result = search(name, macs, ENOUGH, seed=0, budget_range=(0.3, 0.7))
    policy = result.policy
    assert isinstance(policy, AllocationPolicy) and policy.agent == name
    np.testing.assert_allclose(policy.ratios, result.best_ratios)
    if name != "sensitivity":  # the allocation evaluated is the problem's projection of itself
        np.testing.assert_array_equal(policy.keep_for(macs), result.best_keep)
    for target in (0.3, 0.7):
        assert macs.projector.cost_ratio(policy.keep_for(macs, target)) <= target


def test_harness_runs_them(untrained_resnet20: nn.Module, digits: Any, tmp_path: Path) -> None:
    from prune_env.app import benchmark

    results = benchmark.run(
        ["global", "knapsack", "sensitivity"],
        models={"resnet20-untrained": untrained_resnet20},
        datasets={"digits": digits},
        targets=(0.5,),
        seeds=(0,),
        evals=50,
        out=tmp_path / "bench",
        problem_kwargs=QUICK_SCORING,
        agent_settings={"sensitivity": {"ratios": [0.5]}},
        progress=False,
    )
    used = {r["agent"]: int(r["evals_used"]) for r in results.runs}
    assert used == {"global": 1, "knapsack": 1, "sensitivity": 12 * 2 + 1}
