"""Search methods over pruning policies, all behind one interface.

Every method is a registered agent (:mod:`agents.registry`) that spends the evaluations of one
:class:`~agents.evaluator.BudgetedEvaluator`: the baselines ("uniform", "random"); the non-learned
allocations — Torch-Pruning's global ranking ("global") and HALP's knapsack ("knapsack") in
:mod:`agents.allocation`, per-layer sensitivity analysis ("sensitivity") in :mod:`agents.sensitivity`;
the Stable-Baselines3 learners ("ppo", "a2c", "sac", "td3", "ddpg") and AMC's DDPG ("amc"), RL-Pruner
("rlpruner"), MetaPruning's evolution ("evolution") and SeerNet's predictor search ("predictor"). Agent
modules are imported when an agent is first named (:func:`available` lists them), so importing this
package does not import Stable-Baselines3.
"""

from __future__ import annotations

from agents.evaluator import (
    BudgetedEvaluator,
    BudgetExhausted,
    Evaluation,
    ResumeDivergedWarning,
    SearchResult,
)
from agents.registry import (
    AgentSpec,
    available,
    make_settings,
    register_agent,
    resolve_agent,
    run_agent,
    search,
)

__all__ = [
    "AgentSpec",
    "BudgetExhausted",
    "BudgetedEvaluator",
    "Evaluation",
    "ResumeDivergedWarning",
    "SearchResult",
    "available",
    "make_settings",
    "register_agent",
    "resolve_agent",
    "run_agent",
    "search",
]
