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
    resolve_agent,
    run_agent,
)
from prune_env.errors import InvalidSettingError
from prune_env.problem import PruningProblem
from prune_env.rewards import RewardFn, get_reward
from prune_env.validation import check_settings


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
    # Everything is checked before the environment factory builds (and maybe trains) anything.
    check_settings({"budget_evals": budget_evals, "seed": seed})
    reward_fn = get_reward(reward)
    resolve_agent(agent)
    if isinstance(problem_or_env_factory, PruningProblem):
        problem = problem_or_env_factory
    elif callable(problem_or_env_factory):
        env = problem_or_env_factory()
        problem = getattr(env.unwrapped, "problem", None)
        if not isinstance(problem, PruningProblem):
            raise InvalidSettingError(
                "the environment factory must build a prune_env environment (one with a .problem)"
            )
    else:
        raise InvalidSettingError(
            "pass a PruningProblem or a factory of prune_env environments, got "
            f"{type(problem_or_env_factory).__name__}"
        )
    evaluator = BudgetedEvaluator(problem, budget_evals, reward=reward_fn)
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
