"""The common search interface: every method gets the same problem, the same evaluation budget, one seed.

An agent is a function ``run(evaluator, rng, **settings)`` that proposes pruning policies to the
:class:`BudgetedEvaluator` until it says the budget is spent. The evaluator scores every proposal through
the same :class:`~prune_env.problem.PruningProblem` (budget projection, proxy on validation data), records
it, and refuses to go over budget, so methods are compared at exactly equal evaluation counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from prune_env.problem import PruningProblem
from prune_env.rewards import Outcome, RewardFn, evaluate_reward, get_reward


class BudgetExhausted(Exception):
    """Raised by the evaluator when an agent asks for one evaluation more than its budget."""


@dataclass(frozen=True)
class Evaluation:
    """One scored policy, as a flat record (one CSV row)."""

    index: int
    reward: float
    accuracy: float
    loss: float
    macs_ratio: float
    params_ratio: float
    seconds: float
    ratios: tuple[float, ...]
    keep: tuple[int, ...]

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["ratios"] = " ".join(f"{r:.4f}" for r in self.ratios)
        row["keep"] = " ".join(str(k) for k in self.keep)
        return row


@dataclass
class SearchResult:
    """What a search found, and every evaluation it spent."""

    agent: str
    seed: int
    budget_evals: int
    best_reward: float
    best_outcome: Outcome
    history: list[Evaluation] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best_ratios(self) -> np.ndarray:
        return np.asarray(self.best_outcome.ratios)

    @property
    def best_keep(self) -> np.ndarray:
        return np.asarray(self.best_outcome.keep, dtype=np.int64)

    def best_so_far(self) -> np.ndarray:
        """Best reward after each evaluation (a learning curve)."""
        return np.maximum.accumulate(np.array([e.reward for e in self.history]))


class BudgetedEvaluator:
    """Scores policies for an agent, at most ``budget_evals`` times.

    ``evaluate(ratios)`` projects onto the cost target and scores; ``evaluate_keep(keep)`` scores kept
    unit counts (projected too, so no agent can exceed the cost target). Both return ``(outcome, reward)``
    and raise :class:`BudgetExhausted` once the budget is spent. ``on_evaluation`` is called after each one
    (progress bars, checkpoints).
    """

    def __init__(
        self,
        problem: PruningProblem,
        budget_evals: int,
        reward: str | RewardFn = "acc",
        on_evaluation: Callable[[Evaluation], None] | None = None,
    ) -> None:
        if budget_evals < 1:
            raise ValueError(f"budget_evals must be >= 1, got {budget_evals}")
        self.problem = problem
        self.budget_evals = budget_evals
        self.reward_fn = get_reward(reward)
        self.on_evaluation = on_evaluation
        self.history: list[Evaluation] = []
        self.best: tuple[float, Outcome] | None = None
        self._start = time.perf_counter()

    @property
    def used(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int:
        return self.budget_evals - self.used

    @property
    def n_groups(self) -> int:
        return self.problem.n_groups

    def evaluate(self, ratios: np.ndarray) -> tuple[Outcome, float]:
        return self.evaluate_keep(self.problem.keep_for(ratios))

    def preload(self, records: Iterable[Evaluation]) -> None:
        """Replay evaluations logged by an earlier run of the same problem (``prune-env search --resume``).

        They count against the budget and compete for ``best`` exactly as when they were scored, but are
        not re-scored (their accuracy and loss are taken from the log) and ``on_evaluation`` is not called.
        """
        costs = self.problem.graph.costs
        for rec in records:
            if self.remaining <= 0:
                raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
            keep = np.asarray(rec.keep, dtype=np.int64)
            if keep.shape != (self.n_groups,):
                raise ValueError(
                    f"logged evaluation {rec.index} has {keep.size} groups, expected {self.n_groups}"
                )
            outcome = Outcome(
                accuracy=float(rec.accuracy),
                loss=float(rec.loss),
                base_accuracy=self.problem.base_accuracy,
                base_loss=self.problem.base_loss,
                macs=costs.macs(keep),
                params=costs.params(keep),
                base_macs=self.problem.graph.base_macs,
                base_params=self.problem.graph.base_params,
                target=self.problem.target,
                metric=self.problem.metric,
                ratios=self.problem.ratios_for(keep),
                keep=tuple(keep.tolist()),
            )
            entry = replace(rec, index=self.used)
            self.history.append(entry)
            if self.best is None or entry.reward > self.best[0]:
                self.best = (entry.reward, outcome)
        if self.history:
            # Keep the logged wall-clock column continuous across the interruption.
            self._start = time.perf_counter() - self.history[-1].seconds

    def evaluate_keep(self, keep: np.ndarray) -> tuple[Outcome, float]:
        if self.remaining <= 0:
            raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
        keep = np.asarray(keep, dtype=np.int64)
        if not self.problem.projector.cost_ratio(keep) <= self.problem.target * (1 + 1e-9):
            keep = self.problem.keep_for(self.problem.ratios_for(keep))
        outcome = self.problem.evaluate_keep(keep)
        return outcome, self.record(outcome)

    def record(self, outcome: Outcome) -> float:
        """Count and log an outcome scored elsewhere (an environment episode); returns its reward."""
        if self.remaining <= 0:
            raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
        reward = evaluate_reward(self.reward_fn, outcome)
        entry = Evaluation(
            index=self.used,
            reward=reward,
            accuracy=outcome.accuracy,
            loss=outcome.loss,
            macs_ratio=outcome.macs_ratio,
            params_ratio=outcome.params_ratio,
            seconds=time.perf_counter() - self._start,
            ratios=tuple(float(r) for r in outcome.ratios),
            keep=tuple(int(k) for k in outcome.keep),
        )
        self.history.append(entry)
        if self.best is None or reward > self.best[0]:
            self.best = (reward, outcome)
        if self.on_evaluation is not None:
            self.on_evaluation(entry)
        return reward


AgentFn = Callable[..., None]
"""``run(evaluator, rng, **settings)``: propose policies until :class:`BudgetExhausted`."""

AGENTS: dict[str, AgentFn] = {}


def register_agent(name: str) -> Callable[[AgentFn], AgentFn]:
    def decorate(fn: AgentFn) -> AgentFn:
        AGENTS[name] = fn
        return fn

    return decorate


def run_agent(
    agent: str | AgentFn,
    evaluator: BudgetedEvaluator,
    seed: int = 0,
    **settings: Any,
) -> SearchResult:
    """Run ``agent`` until its budget is spent (or it stops early) and collect the result."""
    from prune_env.errors import UnknownNameError

    if isinstance(agent, str):
        if agent not in AGENTS:
            raise UnknownNameError(f"unknown agent {agent!r}; available: {', '.join(sorted(AGENTS))}")
        name, fn = agent, AGENTS[agent]
    else:
        name, fn = getattr(agent, "__name__", "custom"), agent
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    with contextlib.suppress(BudgetExhausted):  # the normal way a search ends
        fn(evaluator, rng, **settings)
    if evaluator.best is None:
        raise RuntimeError(f"agent {name!r} finished without evaluating any policy")
    best_reward, best_outcome = evaluator.best
    return SearchResult(
        agent=name,
        seed=seed,
        budget_evals=evaluator.budget_evals,
        best_reward=best_reward,
        best_outcome=best_outcome,
        history=list(evaluator.history),
        seconds=time.perf_counter() - start,
    )


@register_agent("uniform")
def uniform(evaluator: BudgetedEvaluator, rng: np.random.Generator) -> None:
    """The baseline every method must beat: one ratio for all groups, the smallest meeting the target.

    Deterministic, so it spends one evaluation whatever its budget.
    """
    evaluator.evaluate(np.zeros(evaluator.n_groups))


@register_agent("random")
def random_search(evaluator: BudgetedEvaluator, rng: np.random.Generator) -> None:
    """Random search: ratios drawn uniformly in [0, max_ratio] per group, projected onto the budget."""
    max_ratio = evaluator.problem.max_ratio
    while True:
        evaluator.evaluate(rng.uniform(0.0, max_ratio, evaluator.n_groups))
