"""The evaluation budget every search method spends: one problem, one proxy, an exact count.

:class:`BudgetedEvaluator` scores every proposal through the same :class:`~prune_env.problem.PruningProblem`
(budget projection, proxy on validation data), records it as an :class:`Evaluation`, and refuses to go over
budget, so methods are compared at exactly equal evaluation counts. It also replays a resumed search's log.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from prune_env.errors import InvalidSettingError, ResumeError
from prune_env.problem import PruningProblem
from prune_env.quantization.joint import JointPolicies
from prune_env.rewards import Outcome, RewardFn, evaluate_reward, get_reward
from prune_env.scoring import PolicyScorer
from prune_env.validation import check_settings

NOT_COLUMNS = ("target", "weight_bits", "activation_bits")  # Evaluation fields a CSV row leaves out


class BudgetExhausted(Exception):
    """Raised by the evaluator when an agent asks for one evaluation more than its budget."""


class ResumeDivergedWarning(RuntimeWarning):
    """A resumed agent did not retrace its logged evaluations; the search goes on from where it left."""


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
    # The budget scored against when the search samples one per episode (``budget_range``); None: the
    # problem's target. Not a CSV column: a run of the command line has one target.
    target: float | None = None
    # Joint policies (pruning + quantization): bits per group; empty otherwise. Not CSV columns yet: the
    # command line does not search joint policies.
    weight_bits: tuple[int, ...] = ()
    activation_bits: tuple[int, ...] = ()

    def as_row(self) -> dict[str, Any]:
        """The record as CSV cells (``ratios`` and ``keep`` space-separated); :meth:`from_row` inverts it."""
        row = asdict(self)
        for name in NOT_COLUMNS:
            del row[name]
        row["ratios"] = " ".join(f"{r:.4f}" for r in self.ratios)
        row["keep"] = " ".join(str(k) for k in self.keep)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> Evaluation:
        """The record of CSV cells written by :meth:`as_row`; ``KeyError``/``ValueError`` if they are not."""
        return cls(
            index=int(row["index"]),
            reward=float(row["reward"]),
            accuracy=float(row["accuracy"]),
            loss=float(row["loss"]),
            macs_ratio=float(row["macs_ratio"]),
            params_ratio=float(row["params_ratio"]),
            seconds=float(row["seconds"]),
            ratios=tuple(float(r) for r in row["ratios"].split()),
            keep=tuple(int(k) for k in row["keep"].split()),
        )

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in NOT_COLUMNS]


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
    # What the search leaves for other targets (agents.policies): the SB3 learners' trained policy, or any
    # other agent's best allocation; None for joint (channels + bits) searches of one target.
    policy: Any = None

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
        budget_range: tuple[float, float] | None = None,
        scorer: PolicyScorer | None = None,
    ) -> None:
        check_settings({"budget_evals": budget_evals, "budget_range": budget_range})
        if not isinstance(problem, PruningProblem):
            raise InvalidSettingError(f"problem must be a PruningProblem, got {type(problem).__name__}")
        if scorer is not None and not isinstance(scorer, PolicyScorer):
            raise InvalidSettingError(
                f"scorer must be a prune_env.scoring.PolicyScorer (e.g. prune_env.distributed.RayScorer), got "
                f"{type(scorer).__name__}"
            )
        self.problem = problem
        self.scorer = scorer
        if budget_range is not None:
            for bound in budget_range:
                problem.check_target(bound)
        # Targets sampled per episode by learners that condition on the target (a CACP-style agent serves
        # any budget in the range); other agents score at the problem's target only.
        self.budget_range = None if budget_range is None else (float(budget_range[0]), float(budget_range[1]))
        self.budget_evals = budget_evals
        self.reward_fn = get_reward(reward)
        self.on_evaluation = on_evaluation
        self.history: list[Evaluation] = []
        self.best: tuple[float, Outcome] | None = None
        self._pending: deque[Evaluation] = deque()  # logged evaluations still to be replayed
        self._start = time.perf_counter()

    @property
    def used(self) -> int:
        return len(self.history)

    @property
    def replaying(self) -> bool:
        """Whether logged evaluations given to :meth:`replay` are still to be retraced."""
        return bool(self._pending)

    @property
    def remaining(self) -> int:
        return self.budget_evals - self.used

    @property
    def n_groups(self) -> int:
        return self.problem.n_groups

    @property
    def batch_size(self) -> int:
        """How many proposals an agent with no natural batch should hand :meth:`evaluate_many` at once:
        1 when scoring here, enough to keep every parallel worker busy otherwise."""
        return 1 if self.scorer is None else 2 * self.scorer.workers

    def evaluate(self, ratios: np.ndarray) -> tuple[Outcome, float]:
        self._channels_only()
        return self.evaluate_keep(self.problem.keep_for(ratios))

    def evaluate_many(self, ratios: Sequence[np.ndarray]) -> list[tuple[Outcome, float]]:
        """:meth:`evaluate` of each, scored in parallel when the evaluator has a scorer."""
        self._channels_only()
        return self.evaluate_keeps([self.problem.keep_for(r) for r in ratios])

    def evaluate_keeps(self, keeps: Sequence[np.ndarray]) -> list[tuple[Outcome, float]]:
        """:meth:`evaluate_keep` of each, in order, with the same result and the same history as calling
        it on each in turn: with a scorer, the policies the budget still pays for are first scored all
        at once (results, memo and budget stay here). Raises :class:`BudgetExhausted` where the budget
        runs out, after recording the evaluations it paid for."""
        self._channels_only()
        projected = [self._projected(k) for k in keeps]
        if self.scorer is not None:  # logged policies of a resumed run are remembered: not scored again
            self.problem.prefetch(projected[: max(self.remaining, 0)], self.scorer)
        return [self.evaluate_keep(k) for k in projected]

    def evaluate_joint(
        self, ratios: np.ndarray, weight_bits: np.ndarray, activation_bits: np.ndarray
    ) -> tuple[Outcome, float]:
        """Score a joint policy (ratios and bits per group) of a problem whose policies choose bits,
        projected onto its budget (:meth:`PruningProblem.joint_keep_for`)."""
        self._joint_policies()
        return self._score_joint(*self.problem.joint_keep_for(ratios, weight_bits, activation_bits))

    def evaluate_joint_keep(
        self, keep: np.ndarray, weight_bits: np.ndarray, activation_bits: np.ndarray
    ) -> tuple[Outcome, float]:
        """:meth:`evaluate_joint` of kept counts and bits: scored as they are when within the budget,
        projected first otherwise (as :meth:`evaluate_keep` does for channels)."""
        p, joint = self.problem, self._joint_policies()
        keep = np.asarray(keep, dtype=np.int64)
        w, a = joint.projector.checked_bits(weight_bits, activation_bits)
        cost = joint.projector.cost_ratio(keep, w, a) if joint.constrained else p.projector.cost_ratio(keep)
        if cost > p.target * (1 + 1e-9):
            return self.evaluate_joint(p.ratios_for(keep), w, a)
        return self._score_joint(keep, w, a)

    def _joint_policies(self) -> JointPolicies:
        if self.problem.joint is None:
            raise InvalidSettingError(
                "joint policies need a problem with quantize=True or a BitOps / size budget"
            )
        return self.problem.joint

    def _score_joint(
        self, keep: np.ndarray, weight_bits: np.ndarray, activation_bits: np.ndarray
    ) -> tuple[Outcome, float]:
        if self.remaining <= 0:
            raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
        outcome = self.problem.evaluate_joint(keep, weight_bits, activation_bits)
        return outcome, self.record(outcome)

    def _projected(self, keep: np.ndarray) -> np.ndarray:
        keep = np.asarray(keep, dtype=np.int64)
        if not self.problem.projector.cost_ratio(keep) <= self.problem.target * (1 + 1e-9):
            keep = self.problem.keep_for(self.problem.ratios_for(keep))
        return keep

    def check_log(self, records: Sequence[Evaluation], source: str) -> None:
        """Refuse logged evaluations (``source``: where they were read, e.g. a file name) that this
        problem could not have produced, naming the first bad row: indices must run 0, 1, 2...; kept counts
        lie within 1..units per group; the cost recomputed from them is within the target and equals the
        logged cost ratios; accuracy, loss and reward are finite, and the reward is what this evaluator's
        reward function gives; a policy logged twice has the same score both times (the proxy is
        deterministic). A resumed run trusts nothing else of its log.
        """
        problem = self.problem
        seen: dict[tuple[int, ...], tuple[float, float]] = {}
        for position, rec in enumerate(records):
            where = f"{source}, evaluation {position}"
            if rec.index != position:
                raise ResumeError(f"{where}: index {rec.index} breaks the sequence 0, 1, 2, ...")
            keep = np.asarray(rec.keep, dtype=np.int64)
            if keep.shape != (self.n_groups,):
                raise ResumeError(f"{where}: {keep.size} kept counts, the problem has {self.n_groups} groups")
            bad = np.flatnonzero((keep < 1) | (keep > problem.units))
            if bad.size:
                g = int(bad[0])
                raise ResumeError(
                    f"{where}: kept count {int(keep[g])} for group {problem.group_names[g]!r} is outside "
                    f"1..{int(problem.units[g])}"
                )
            values = (rec.reward, rec.accuracy, rec.loss, rec.macs_ratio, rec.params_ratio, rec.seconds)
            if not all(math.isfinite(v) for v in values):
                raise ResumeError(f"{where}: a non-finite value among reward, accuracy, loss, costs, seconds")
            outcome = problem.outcome(keep, accuracy=rec.accuracy, loss=rec.loss)
            if not outcome.cost_ratio <= problem.target * (1 + 1e-9):
                raise ResumeError(
                    f"{where}: its kept counts cost {outcome.cost_ratio:.4f} of the base {problem.metric}, "
                    f"over the target {problem.target:g}"
                )
            if not (
                math.isclose(rec.macs_ratio, outcome.macs_ratio, rel_tol=1e-9)
                and math.isclose(rec.params_ratio, outcome.params_ratio, rel_tol=1e-9)
            ):
                raise ResumeError(f"{where}: the logged cost ratios do not match its kept counts")
            if not math.isclose(rec.reward, evaluate_reward(self.reward_fn, outcome), rel_tol=1e-9):
                raise ResumeError(f"{where}: the logged reward is not what the reward gives for this row")
            score = seen.setdefault(rec.keep, (rec.accuracy, rec.loss))
            if score != (rec.accuracy, rec.loss):
                raise ResumeError(f"{where}: the same policy was logged earlier with another score")

    def preload(self, records: Iterable[Evaluation]) -> None:
        """Take logged evaluations of an earlier run of the same problem as spent (a resumed run whose
        search was complete): they count against the budget and compete for ``best`` exactly as when they
        were scored, without being re-scored and without ``on_evaluation``. Check them with
        :meth:`check_log` first.
        """
        for rec in records:
            if self.remaining <= 0:
                raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
            keep = np.asarray(rec.keep, dtype=np.int64)
            self._append(
                replace(rec, index=self.used),
                self.problem.outcome(keep, accuracy=rec.accuracy, loss=rec.loss),
            )
        if self.history:
            # Keep the logged wall-clock column continuous across the interruption.
            self._start = time.perf_counter() - self.history[-1].seconds

    def replay(self, records: Sequence[Evaluation]) -> None:
        """Resume an interrupted search so that it ends as the uninterrupted one would have.

        The agent is started again from the beginning, with the same seed; its first proposals are
        answered from the log (``records``, checked with :meth:`check_log`) instead of the proxy, and not
        passed to ``on_evaluation`` again. Agents are deterministic given their seed and the scores they
        see, so the replayed agent proposes exactly the logged policies and reaches the state it had when
        it was interrupted; from there on it runs live. Should a proposal differ from the log (a changed
        budget the agent sizes itself by, or non-deterministic kernels), the rest of the log is taken as
        spent, a :class:`ResumeDivergedWarning` says so, and the search continues live from that point.
        """
        for rec in records:
            self.problem.remember(rec.keep, rec.accuracy, rec.loss)
        self._pending = deque(records)

    def _replayed(self, outcome: Outcome) -> float | None:
        """The logged reward when ``outcome`` is the next logged policy; ``None`` once the log is used up."""
        if not self._pending:
            return None
        expected = self._pending[0]
        if tuple(int(k) for k in outcome.keep) != expected.keep:
            warnings.warn(
                f"the resumed agent proposed another policy than logged evaluation {expected.index}; "
                f"the {len(self._pending)} remaining logged evaluations count as spent and the search "
                "continues from here",
                ResumeDivergedWarning,
                stacklevel=4,
            )
            pending, self._pending = list(self._pending), deque()
            self.preload(pending)
            return None
        self._pending.popleft()
        self._append(expected, outcome)
        if not self._pending:
            self._start = time.perf_counter() - expected.seconds
        return expected.reward

    def _append(self, entry: Evaluation, outcome: Outcome) -> None:
        self.history.append(entry)
        if self.best is None or entry.reward > self.best[0]:
            self.best = (entry.reward, outcome)

    def _channels_only(self) -> None:
        if self.problem.joint is not None:
            raise InvalidSettingError(
                "this problem's policies choose bits as well as channels (quantize=True or a BitOps / size "
                "budget); agents proposing kept channels alone cannot search it — use an environment-based "
                "agent (ppo, a2c, sac, td3, ddpg, amc)"
            )

    def evaluate_keep(self, keep: np.ndarray) -> tuple[Outcome, float]:
        self._channels_only()
        if self.remaining <= 0:
            raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
        outcome = self.problem.evaluate_keep(self._projected(keep))
        return outcome, self.record(outcome)

    def _checked_target(self, outcome: Outcome) -> float | None:
        """The outcome's own budget when targets are sampled (which must lie in the range), else None;
        either way its cost must be within it — no evaluation is ever counted over budget."""
        target = float(outcome.target)
        if self.budget_range is None:
            target_ok = math.isclose(target, self.problem.target, rel_tol=1e-12)
        else:
            lo, hi = self.budget_range
            target_ok = lo - 1e-12 <= target <= hi + 1e-12
        if not target_ok or not outcome.cost_ratio <= target * (1 + 1e-9):
            raise InvalidSettingError(
                f"an outcome at target {target:g} costing {outcome.cost_ratio:.4f} cannot be counted by an "
                f"evaluator for {self.budget_range or self.problem.target}: score policies with this "
                "evaluator's problem and targets"
            )
        return target if self.budget_range is not None else None

    def record(self, outcome: Outcome) -> float:
        """Count and log an outcome scored elsewhere (an environment episode); returns its reward."""
        if self.remaining <= 0:
            raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
        replayed = self._replayed(outcome)
        if replayed is not None:
            return replayed
        if self.remaining <= 0:  # the rest of a diverged log may have used the budget up
            raise BudgetExhausted(f"evaluation budget of {self.budget_evals} spent")
        target = self._checked_target(outcome)
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
            target=target,
            weight_bits=outcome.weight_bits,
            activation_bits=outcome.activation_bits,
        )
        self._append(entry, outcome)
        if self.on_evaluation is not None:
            self.on_evaluation(entry)
        return reward
