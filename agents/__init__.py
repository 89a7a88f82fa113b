"""Search methods over pruning policies, all behind one interface (see :mod:`agents.base`).

Importing this package registers every agent in :data:`AGENTS`: the baselines ("uniform", "random"),
the Stable-Baselines3 learners ("ppo", "a2c", "sac", "td3", "ddpg") and AMC's DDPG ("amc"), RL-Pruner
("rlpruner"), MetaPruning's evolution ("evolution") and SeerNet's predictor search ("predictor").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

from agents import evolution, predictor, rlpruner, sb3  # noqa: F401  (registers the agents)
from agents.base import (
    AGENTS,
    BudgetedEvaluator,
    BudgetExhausted,
    Evaluation,
    SearchResult,
    register_agent,
    run_agent,
)
from prune_env.problem import PruningProblem
from prune_env.rewards import RewardFn


def search(
    agent: str | Callable[..., None],
    problem_or_env_factory: PruningProblem | Callable[[], gym.Env],
    budget_evals: int,
    seed: int = 0,
    reward: str | RewardFn = "acc",
    **settings: Any,
) -> SearchResult:
    """Run ``agent`` on a problem (or on the problem of an environment the factory builds) with a fresh
    :class:`BudgetedEvaluator` of ``budget_evals`` proxy evaluations; ``settings`` go to the agent.
    """
    if isinstance(problem_or_env_factory, PruningProblem):
        problem = problem_or_env_factory
    else:
        env = problem_or_env_factory()
        problem = getattr(env.unwrapped, "problem", None)
        if not isinstance(problem, PruningProblem):
            raise TypeError("the environment factory must build a prune_env environment (with .problem)")
    evaluator = BudgetedEvaluator(problem, budget_evals, reward=reward)
    return run_agent(agent, evaluator, seed=seed, **settings)


__all__ = [
    "AGENTS",
    "BudgetExhausted",
    "BudgetedEvaluator",
    "Evaluation",
    "SearchResult",
    "register_agent",
    "run_agent",
    "search",
]
