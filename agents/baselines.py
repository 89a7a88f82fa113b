"""The baselines every method must beat: uniform pruning and random search."""

from __future__ import annotations

import numpy as np

from agents.evaluator import BudgetedEvaluator
from agents.registry import NoSettings, register_agent
from prune_env.quantization.bits import BIT_CHOICES


@register_agent("uniform", joint_policies=True)
def uniform(evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: NoSettings) -> None:
    """The baseline every method must beat: one ratio for all groups, the smallest meeting the target.

    With joint policies, every layer at the problem's ``other_bits`` (8 by default: pruning alone, at the
    precision deployment uses), lowered for all groups alike only if no pruning fits. Deterministic, so it
    spends one evaluation whatever its budget.
    """
    n = evaluator.n_groups
    if evaluator.problem.joint is None:
        evaluator.evaluate(np.zeros(n))
        return
    bits = np.full(n, evaluator.problem.settings.other_bits)
    evaluator.evaluate_joint(np.zeros(n), bits, bits)


@register_agent("random", joint_policies=True)
def random_search(evaluator: BudgetedEvaluator, rng: np.random.Generator, settings: NoSettings) -> None:
    """Random search: ratios drawn uniformly in [0, max_ratio] per group, projected onto the budget.

    Proposals do not depend on scores, so they are handed over in batches (scored in parallel when the
    evaluator has workers); the draws, and so the search, are the same whatever the batch size. With joint
    policies, each group's weight and activation bits are drawn uniformly among the choices too (scored
    one at a time for now).
    """
    max_ratio = evaluator.problem.max_ratio
    n = evaluator.n_groups
    if evaluator.problem.joint is not None:  # bits drawn uniformly among the choices, per group
        while True:
            ratios = rng.uniform(0.0, max_ratio, n)
            w, a = rng.choice(BIT_CHOICES, n), rng.choice(BIT_CHOICES, n)
            evaluator.evaluate_joint(ratios, w, a)
    while True:
        evaluator.evaluate_many(
            [rng.uniform(0.0, max_ratio, evaluator.n_groups) for _ in range(evaluator.batch_size)]
        )
