"""The registry of search methods: one place where agents are named, discovered and run.

An agent is registered with :func:`register_agent` as ``run(evaluator, rng, settings)``: it proposes
pruning policies to the :class:`~agents.evaluator.BudgetedEvaluator` until the budget is spent, with
``settings`` an instance of the frozen dataclass it declares (built from keyword overrides, unknown keys
refused). Agent modules register themselves when imported; :func:`discover` imports each module of this
package once, so naming an agent never depends on what the caller happened to import, and a module that
fails to import (a missing optional dependency) is reported with the agent's name instead of breaking the
others.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents.evaluator import BudgetedEvaluator, BudgetExhausted, SearchResult
from agents.policies import AllocationPolicy
from agents.tensorboard import EvaluationWriter
from prune_env.distributed import RayScorer
from prune_env.errors import InvalidSettingError, UnknownNameError
from prune_env.optional_ray import uses_ray
from prune_env.problem import PruningProblem
from prune_env.rewards import RewardFn, get_reward
from prune_env.settings import replace_checked
from prune_env.validation import check_settings


@dataclass(frozen=True)
class NoSettings:
    """The settings of an agent that has none."""


@dataclass(frozen=True)
class AgentSpec:
    """A registered agent: its name, its function ``run(evaluator, rng, settings)`` and settings class."""

    name: str
    # (evaluator, rng, settings); a user's function takes keyword settings. It may return the policy it
    # learned (an object with ``keep_for(problem, target)``), which the search result carries.
    run: Callable[..., Any]
    settings: type = NoSettings
    budget_conditioned: bool = False  # learns one policy for any target in a budget_range
    joint_policies: bool = False  # searches bits as well as channels (through the environments)
    latency_budget: bool = True  # meets a latency budget (every agent whose costs come from the projector)

    def make_settings(self, overrides: Mapping[str, Any] | None = None) -> Any:
        """The agent's default settings with ``overrides`` applied (``dataclasses.replace``)."""
        return make_settings(self.settings, overrides or {}, f"agent {self.name!r}")


def make_settings(cls: type, overrides: Mapping[str, Any], owner: str) -> Any:
    """``cls()`` with ``overrides``; unknown keys raise :class:`InvalidSettingError` listing the known."""
    return replace_checked(cls(), overrides, owner)


AGENTS: dict[str, AgentSpec] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_DISCOVERED = False


def register_agent(
    name: str,
    settings: type = NoSettings,
    *,
    budget_conditioned: bool = False,
    joint_policies: bool = False,
    latency_budget: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``run(evaluator, rng, settings)`` under ``name`` with its settings dataclass;
    ``budget_conditioned``: it learns from episodes whose targets the evaluator's ``budget_range`` samples
    (the target is in its observation), so one search serves every target in the range;
    ``joint_policies``: it can search problems whose policies choose bits as well as channels;
    ``latency_budget``: it can meet a latency budget (false for an agent that needs a bilinear cost model)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        AGENTS[name] = AgentSpec(name, fn, settings, budget_conditioned, joint_policies, latency_budget)
        return fn

    return decorate


def discover() -> dict[str, AgentSpec]:
    """Every registered agent, after importing each module of the ``agents`` package once."""
    global _DISCOVERED
    if not _DISCOVERED:
        # This module's own directory is the package's: found without importing the package back.
        for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
            try:
                importlib.import_module(f"agents.{info.name}")
            except Exception as exc:  # an agent with a missing optional dependency must not break the others
                _IMPORT_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
        _DISCOVERED = True
    return AGENTS


def available() -> list[str]:
    """Names of every agent that can run here."""
    return sorted(discover())


def resolve_agent(agent: str | Callable[..., None]) -> AgentSpec:
    """The :class:`AgentSpec` of a registered name; a plain function is wrapped as an agent without
    settings of its own (it receives keyword overrides as keyword arguments)."""
    if isinstance(agent, str):
        registry = discover()
        if agent not in registry:
            hint = ""
            if _IMPORT_ERRORS:
                failed = "; ".join(f"agents.{m}: {e}" for m, e in sorted(_IMPORT_ERRORS.items()))
                hint = f" (modules that failed to import: {failed})"
            raise UnknownNameError(f"unknown agent {agent!r}; available: {', '.join(sorted(registry))}{hint}")
        return registry[agent]
    if not callable(agent):
        raise InvalidSettingError(
            f"agent must be a registered name or a function, got {type(agent).__name__}"
        )
    return AgentSpec(getattr(agent, "__name__", "custom"), agent, _KeywordSettings)


@dataclass(frozen=True)
class _KeywordSettings:
    """A user's agent function takes its settings as keyword arguments, unchecked here."""


def check_joint_policies(spec: AgentSpec, problem: PruningProblem) -> None:
    """Refuse a problem with joint policies (bits too) for an agent that proposes kept channels alone."""
    if problem.joint is not None and not spec.joint_policies:
        able = ", ".join(n for n, a in sorted(discover().items()) if a.joint_policies)
        raise InvalidSettingError(
            f"agent {spec.name!r} proposes kept channels alone; this problem's policies choose bits as well "
            f"(quantize=True or a BitOps / size budget): search it with {able}"
        )


def check_budget_range(
    spec: AgentSpec, budget_range: tuple[float, float] | None, target: float, metric: str = "macs"
) -> None:
    """A budget-conditioned agent learns over the whole range; any other searches the problem's own target
    and carries its best allocation over to the range (an AllocationPolicy), so that target must lie in it.
    And the budget's ``metric`` must be one the agent can meet (a latency is not a bilinear cost model)."""
    if metric == "latency" and not spec.latency_budget:
        able = ", ".join(n for n, a in sorted(discover().items()) if a.latency_budget)
        raise InvalidSettingError(
            f"agent {spec.name!r} needs a differentiable MACs or parameter cost model, which a latency table "
            f"is not: search a latency budget with {able}"
        )
    if budget_range is None or spec.budget_conditioned:
        return
    lo, hi = budget_range
    if not lo <= target <= hi:
        able = ", ".join(n for n, a in sorted(discover().items()) if a.budget_conditioned)
        raise InvalidSettingError(
            f"agent {spec.name!r} searches one target, {target:g}, and carries its best allocation over to "
            f"budget_range {lo:g} to {hi:g}: set the target inside the range, or use an agent that learns "
            f"over it ({able})"
        )


def run_agent(
    agent: str | Callable[..., None],
    evaluator: BudgetedEvaluator,
    seed: int = 0,
    **settings: Any,
) -> SearchResult:
    """Run ``agent`` until its budget is spent (or it stops early) and collect the result.

    ``settings``: overrides of the agent's settings dataclass (unknown keys are refused before the search
    starts); a plain function receives them as keyword arguments.
    """
    check_settings({"seed": seed})
    spec = resolve_agent(agent)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    check_budget_range(spec, evaluator.budget_range, evaluator.problem.target, evaluator.problem.metric)
    check_joint_policies(spec, evaluator.problem)
    policy = None
    with contextlib.suppress(BudgetExhausted):  # the normal way a search ends
        if spec.settings is _KeywordSettings:
            policy = spec.run(evaluator, rng, **settings)
        else:
            policy = spec.run(evaluator, rng, spec.make_settings(settings))
    if evaluator.best is None:
        raise RuntimeError(f"agent {spec.name!r} finished without evaluating any policy")
    best_reward, best_outcome = evaluator.best
    if policy is None and evaluator.problem.joint is None:
        # What an agent of one target leaves: its best allocation, for any target.
        policy = AllocationPolicy(
            spec.name, tuple(float(r) for r in best_outcome.ratios), evaluator.budget_range
        )
    return SearchResult(
        agent=spec.name,
        seed=seed,
        budget_evals=evaluator.budget_evals,
        best_reward=best_reward,
        best_outcome=best_outcome,
        history=list(evaluator.history),
        seconds=time.perf_counter() - start,
        policy=policy,
    )


def _problem_of(problem_or_env_factory: Any) -> PruningProblem:
    """The problem given, or the problem of the environment the factory builds."""
    if isinstance(problem_or_env_factory, PruningProblem):
        return problem_or_env_factory
    if callable(problem_or_env_factory):
        built = getattr(problem_or_env_factory().unwrapped, "problem", None)
        if not isinstance(built, PruningProblem):
            raise InvalidSettingError(
                "the environment factory must build a prune_env environment (one with a .problem)"
            )
        return built
    raise InvalidSettingError(
        f"pass a PruningProblem or a factory of prune_env environments, got {type(problem_or_env_factory).__name__}"
    )


def search(
    agent: str | Callable[..., None],
    problem_or_env_factory: PruningProblem | Callable[[], gym.Env],
    budget_evals: int,
    seed: int = 0,
    reward: str | RewardFn = "acc",
    tensorboard_log: str | None = None,
    budget_range: tuple[float, float] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    **settings: Any,
) -> SearchResult:
    """Run ``agent`` on a problem (or on the problem of an environment the factory builds) with a fresh
    :class:`BudgetedEvaluator` of ``budget_evals`` proxy evaluations; ``settings`` go to the agent.

    ``tensorboard_log``: a directory for TensorBoard scalars of every evaluation, whatever the agent
    (:class:`~agents.tensorboard.EvaluationWriter`); an agent with TensorBoard logs of its own (the SB3
    learners) writes them there too unless its settings name another directory.

    ``budget_range=(lo, hi)``: budget-conditioned agents (the SB3 learners) train one target-conditioned
    policy (CACP-style) on episodes whose targets are drawn from the range; every other agent searches the
    problem's target, which must lie in the range, and its policy is its best allocation carried over
    (:class:`~agents.policies.AllocationPolicy`). Either way ``result.policy.keep_for(problem, target)``
    prunes for any target in the range without another evaluation, and ``save`` /
    :func:`~agents.policies.load_policy` keep it.

    ``workers=N`` scores the batches agents propose (random search, evolution's generations, the
    predictor's initial samples, RL-Pruner's samples) on N Ray actors (:class:`~prune_env.distributed.RayScorer`,
    ``pip install prune-env[ray]``); ``ray_address`` joins a running cluster instead of starting Ray here.
    The search — proposals, scores, history, best policy — is the same as without workers for the same seed.
    """
    # Everything is checked before the environment factory builds (and maybe trains) anything.
    check_settings({"budget_evals": budget_evals, "seed": seed, "budget_range": budget_range})
    check_settings({"workers": workers, "ray_address": ray_address})
    parallel = uses_ray(workers, ray_address)
    if tensorboard_log is not None and not isinstance(tensorboard_log, str | Path):
        raise InvalidSettingError(
            f"tensorboard_log must be a directory path, got {type(tensorboard_log).__name__}"
        )
    reward_fn = get_reward(reward)
    spec = resolve_agent(agent)
    if spec.settings is not _KeywordSettings:
        spec.make_settings(settings)
    problem = _problem_of(problem_or_env_factory)
    check_budget_range(spec, budget_range, problem.target, problem.metric)
    own_logs = spec.settings is not _KeywordSettings and "tensorboard_log" in {
        f.name for f in fields(spec.settings)
    }
    if tensorboard_log is not None and own_logs:
        settings.setdefault("tensorboard_log", str(tensorboard_log))
    writer = EvaluationWriter(tensorboard_log) if tensorboard_log is not None else None
    scorer = None
    try:  # the log and the Ray workers are released however this ends, a refused argument included
        if parallel:
            scorer = RayScorer(problem, workers, address=ray_address)
        evaluator = BudgetedEvaluator(
            problem,
            budget_evals,
            reward=reward_fn,
            on_evaluation=writer,
            budget_range=budget_range,
            scorer=scorer,
        )
        return run_agent(agent, evaluator, seed=seed, **settings)
    finally:
        if writer is not None:
            writer.close()
        if scorer is not None:
            scorer.close()
