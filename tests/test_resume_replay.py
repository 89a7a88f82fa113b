"""Resuming a search: the agent retraces its logged evaluations and ends exactly as the uninterrupted one.

Every registered agent is interrupted mid-search (as Ctrl-C would), then resumed from the evaluations it
logged with a fresh evaluator: the resumed history must equal an uninterrupted run's, evaluation by
evaluation, and the logged policies must not be scored by the proxy again.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from quick import QUICK_SCORING
from torch import nn

from agents import BudgetedEvaluator, Evaluation, ResumeDivergedWarning, available, run_agent, search
from prune_env.errors import ResumeError
from prune_env.problem import PruningProblem

BUDGET = 6
STOP_AT = 3


def _trace(history: list[Evaluation]) -> list[tuple]:
    return [(e.index, e.keep, e.reward, e.accuracy, e.loss) for e in history]


def _interrupted(problem: PruningProblem, name: str, seed: int) -> list[Evaluation]:
    """The evaluations an agent logged before a Ctrl-C after ``STOP_AT`` of them."""

    def stop(entry: Evaluation) -> None:
        if entry.index + 1 == STOP_AT:
            raise KeyboardInterrupt

    evaluator = BudgetedEvaluator(problem, BUDGET, on_evaluation=stop)
    with pytest.raises(KeyboardInterrupt):
        run_agent(name, evaluator, seed=seed)
    return list(evaluator.history)


def _resumed(problem: PruningProblem, name: str, seed: int, logged: list[Evaluation]) -> list[Evaluation]:
    evaluator = BudgetedEvaluator(problem, BUDGET)
    evaluator.check_log(logged, "the log")
    evaluator.replay(logged)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeDivergedWarning)  # a resumed agent must not diverge
        return run_agent(name, evaluator, seed=seed).history


# uniform, global and knapsack search with one evaluation; sensitivity needs more than BUDGET and its
# resume is tested in test_allocation_baselines.py.
@pytest.mark.parametrize("name", sorted(set(available()) - {"uniform", "global", "knapsack", "sensitivity"}))
def test_resumed_search_equals_uninterrupted(problem: PruningProblem, name: str) -> None:
    uninterrupted = search(name, problem, BUDGET, seed=3).history
    logged = _interrupted(problem, name, seed=3)
    assert len(logged) == STOP_AT
    assert _trace(_resumed(problem, name, 3, logged)) == _trace(uninterrupted)


def test_replayed_policies_are_not_scored_again(untrained_resnet20: nn.Module, digits: Any) -> None:
    fresh = PruningProblem(untrained_resnet20, digits, target_macs=0.5, **QUICK_SCORING)
    logged = _interrupted(fresh, "random", seed=0)
    scored = fresh.evaluations
    again = PruningProblem(
        untrained_resnet20, digits, target_macs=0.5, **QUICK_SCORING
    )  # an empty memo, as a new process
    history = _resumed(again, "random", 0, logged)
    assert len(history) == BUDGET
    assert again.evaluations == len({e.keep for e in history[STOP_AT:]}) <= BUDGET - STOP_AT
    assert scored == len({e.keep for e in logged})


def test_a_diverging_replay_warns_and_keeps_the_logged_evaluations(problem: PruningProblem) -> None:
    logged = _interrupted(problem, "random", seed=0)
    evaluator = BudgetedEvaluator(problem, BUDGET)
    evaluator.replay(logged)
    with pytest.warns(ResumeDivergedWarning, match="remaining logged evaluations count as spent"):
        history = run_agent("random", evaluator, seed=1).history  # another seed proposes other policies
    assert len(history) == BUDGET
    assert {e.keep for e in logged} <= {e.keep for e in history}
    assert [e.index for e in history] == list(range(BUDGET))


def _logged(problem: PruningProblem) -> list[Evaluation]:
    return search("random", problem, 3, seed=0).history


def _forge(problem: PruningProblem, position: int, **changes: Any) -> list[Evaluation]:
    from dataclasses import replace

    rows = _logged(problem)
    rows[position] = replace(rows[position], **changes)
    return rows


def _same_policy_other_score(problem: PruningProblem) -> dict[str, Any]:
    first = _logged(problem)[0]
    return {
        "keep": first.keep,
        "macs_ratio": first.macs_ratio,
        "params_ratio": first.params_ratio,
        "accuracy": 0.0,
        "reward": 0.0,  # the "acc" reward is the accuracy: consistent in itself
    }


@pytest.mark.parametrize(
    ("forgery", "message"),
    [
        (lambda p: _forge(p, 1, index=5), "index 5 breaks the sequence"),
        (lambda p: _forge(p, 0, keep=(0, *_logged(p)[0].keep[1:])), "kept count 0"),
        (lambda p: _forge(p, 0, keep=_logged(p)[0].keep[1:]), "kept counts, the problem has"),
        (lambda p: _forge(p, 2, reward=float("nan")), "non-finite"),
        (lambda p: _forge(p, 2, reward=0.999), "not what the reward gives"),
        (lambda p: _forge(p, 1, macs_ratio=0.1), "cost ratios do not match"),
        (
            lambda p: _forge(
                p, 2, keep=tuple(int(c) for c in p.units), reward=1.0, accuracy=1.0, macs_ratio=1.0
            ),
            "over the target",
        ),
        (lambda p: _forge(p, 1, **_same_policy_other_score(p)), "logged earlier with another score"),
    ],
)
def test_forged_logs_are_refused(problem: PruningProblem, forgery: Any, message: str) -> None:
    rows = forgery(problem)
    with pytest.raises(ResumeError, match=message):
        BudgetedEvaluator(problem, BUDGET).check_log(rows, "evaluations.csv")


def test_an_honest_log_passes(problem: PruningProblem) -> None:
    rows = _logged(problem)
    BudgetedEvaluator(problem, BUDGET).check_log(rows, "evaluations.csv")
    assert np.isfinite([r.reward for r in rows]).all()
