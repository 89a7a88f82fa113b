"""The baselines every method must beat: uniform pruning and random search."""

from __future__ import annotations

import numpy as np

from agents.evaluator import BudgetedEvaluator
from agents.registry import NoSettings, register_agent


@register_agent("uniform")
def uniform(evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: NoSettings) -> None:
    """The baseline every method must beat: one ratio for all groups, the smallest meeting the target.

    Deterministic, so it spends one evaluation whatever its budget.
    """
    evaluator.evaluate(np.zeros(evaluator.n_groups))


@register_agent("random")
def random_search(evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: NoSettings) -> None:
    """Random search: ratios drawn uniformly in [0, max_ratio] per group, projected onto the budget.

    Proposals do not depend on scores, so they are handed over in batches (scored in parallel when the
    evaluator has workers); the draws, and so the search, are the same whatever the batch size.
    """
    max_ratio = evaluator.problem.max_ratio
    while True:
        evaluator.evaluate_many(
            [rng.uniform(0.0, max_ratio, evaluator.n_groups) for _ in range(evaluator.batch_size)]
        )
