"""RL-Pruner's search: a learned pruning distribution, improved toward its best noisy samples.

RL-Pruner (Wang et al., 2024, "RL-Pruner: Structured Pruning Using Reinforcement Learning for CNN
Compression and Acceleration") keeps a *pruning distribution* — how much of each layer to remove — and
improves it like a policy: each step it samples noisy variants of the distribution, prunes and scores
them, and moves the distribution toward the best-rewarded sample with a learning rate (a greedy policy
update, close to a cross-entropy method). The pruning itself is iterative: several rounds each prune a
step toward the target and fine-tune the pruned model with knowledge distillation from its predecessor,
which then becomes the base of the next round.

Here the distribution is the vector of per-group ratios (its mean) and an exploration σ that decays; every
sample is projected onto the round's cost target, so each evaluation is a valid policy. With ``rounds > 1``
each round gets an equal share of the evaluation budget (shared through the one evaluator), its own
:class:`~prune_env.problem.PruningProblem` on the distilled model, and a geometric intermediate target.
Evaluations of later rounds are recorded in the original problem's terms (kept channels per group, MACs
of the original model) so every history stays comparable; their accuracy, however, is that of the
iteratively distilled model, which the one-shot proxy of other agents does not include.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.evaluator import BudgetedEvaluator, BudgetExhausted
from agents.policies import AllocationPolicy
from agents.registry import register_agent
from prune_env.batches import iterate_batches
from prune_env.errors import InvalidSettingError, UnsupportedLayerError
from prune_env.graph import units_to_keep
from prune_env.problem import PruningProblem
from prune_env.train import kd_loss


@dataclass(frozen=True)
class RLPrunerSettings:
    """Hyper-parameters of :func:`rlpruner` (defaults sized for budgets of tens of evaluations)."""

    samples: int = 4  # noisy samples per policy update
    sigma: float = 0.15  # initial exploration noise on ratios (absolute ratio units)
    sigma_decay: float = 0.9  # σ ← σ·decay after each update
    lr: float = 0.5  # step of the mean toward the best sample
    rounds: int = 1  # iterative pruning rounds (KD fine-tune between rounds)
    kd_steps: int = 50  # SGD steps of distillation between rounds
    kd_lr: float = 0.01
    kd_batch_size: int = 64


def _distill(
    student: nn.Module, teacher: nn.Module, problem: PruningProblem, s: RLPrunerSettings, seed: int
) -> None:
    """A few SGD steps of KD from ``teacher`` on the training split (never validation or test)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(student.parameters(), lr=s.kd_lr, momentum=0.9)
    student.train()
    teacher.eval()
    step = 0
    while step < s.kd_steps:
        for x, y in iterate_batches(problem.data.train, s.kd_batch_size, shuffle=True, generator=generator):
            x, y = x.to(problem.device), y.to(problem.device)
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = kd_loss(student(x), teacher_logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= s.kd_steps:
                break
    student.eval()


def _round_problem(original: PruningProblem, model: nn.Module, target: float) -> PruningProblem:
    """A problem on the distilled, pruned ``model`` with the original settings and a new target."""
    # The original's one budget, in its metric.
    changes: dict[str, Any] = {f"target_{original.metric}": target, "progress": False}
    settings = replace(original.settings, **changes)
    return PruningProblem(model, original.splits, settings)


@register_agent("rlpruner", RLPrunerSettings)
def rlpruner(
    evaluator: BudgetedEvaluator, rng: np.random.Generator, s: RLPrunerSettings
) -> AllocationPolicy | None:
    """RL-Pruner: sample noisy pruning distributions, move the distribution toward the best one.

    See :class:`RLPrunerSettings` for the settings. ``rounds > 1`` prunes iteratively with KD in between.
    Returns the learned distribution (its mean ratios) as the policy for other targets; with several rounds
    the last round's distribution is over the distilled model, so the best allocation stands in for it.
    """
    if s.rounds < 1 or s.samples < 1:
        raise InvalidSettingError(f"rounds and samples must be >= 1, got {s.rounds} and {s.samples}")
    original = evaluator.problem
    if s.rounds > 1 and original.metric == "latency":
        # A later round prunes the distilled model, whose measured table is not the original's predictions:
        # its local targets would not add up to the original's latency budget.
        raise InvalidSettingError(
            f"rlpruner rounds={s.rounds} prunes a distilled model in later rounds, whose latency is another "
            "table's measurement than the original's: a latency budget takes rounds=1"
        )
    # Each round removes the same fraction of the remaining cost: target_r = target^(r / rounds).
    targets = [original.target ** ((r + 1) / s.rounds) for r in range(s.rounds)]
    problem, reached = original, 1.0  # the round's problem; cost of its base model relative to the original
    prev_keep = original.units.copy()  # the round's base channels, in original units
    for r in range(s.rounds):
        last = r == s.rounds - 1
        evals = evaluator.remaining if last else max(1, evaluator.remaining // (s.rounds - r))
        local_target = min(1.0, targets[r] / reached)
        best_keep, mean = _search_round(evaluator, problem, original, prev_keep, local_target, evals, rng, s)
        if last:
            if s.rounds > 1:
                return None
            return AllocationPolicy("rlpruner", tuple(float(v) for v in mean), evaluator.budget_range)
        # Prune to the round's best, distil from the round's base, and continue from there.
        teacher = problem.base_model
        student = problem.build(best_keep)
        _distill(student, teacher, problem, s, seed=int(rng.integers(2**31)))
        prev_keep = best_keep.copy()
        reached = _cost(original, best_keep)
        # The next target, relative to the distilled model; never below what max_ratio can reach.
        floor = (
            _cost(original, units_to_keep(prev_keep, np.full(len(prev_keep), original.max_ratio))) / reached
        )
        next_local = min(1.0, max(targets[r + 1] / reached, floor * (1 + 1e-6)))
        problem = _round_problem(original, student, next_local)
        if problem.n_groups != original.n_groups:
            raise UnsupportedLayerError("the pruned model's groups do not match the original's; use rounds=1")
    return None


def _cost(problem: PruningProblem, keep: np.ndarray) -> float:
    """The constrained cost of ``keep`` (original units) as a fraction of the original model's."""
    return problem.projector.cost_ratio(np.asarray(keep, dtype=np.int64))


def _search_round(
    evaluator: BudgetedEvaluator,
    problem: PruningProblem,
    original: PruningProblem,
    prev_keep: np.ndarray,
    target: float,
    evals: int,
    rng: np.random.Generator,
    s: RLPrunerSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """One round of distribution search on ``problem``; returns the best kept counts (original units) and
    the distribution's final mean ratios."""
    n = problem.n_groups
    # Start from the uniform policy of this round: the baseline every sample must beat.
    mean = problem.ratios_for(problem.uniform_keep(target))
    sigma = s.sigma
    best: tuple[float, np.ndarray] | None = None
    spent = 0
    while spent < evals:
        keeps = []
        for i in range(min(s.samples, evals - spent)):
            # The first draw of the first batch is the mean itself, so the distribution is always scored.
            noise = np.zeros(n) if (spent == 0 and i == 0) else rng.normal(0.0, sigma, n)
            ratios = np.clip(mean + noise, 0.0, problem.max_ratio)
            keeps.append(problem.keep_for(ratios, target))
            spent += 1
        # A batch's samples do not depend on each other's scores: scored together (in parallel when the
        # evaluator has workers and the round prunes the original model).
        if problem is original:
            rewards = [reward for _, reward in evaluator.evaluate_keeps(keeps)]
        else:
            rewards = [_score(evaluator, problem, original, keep) for keep in keeps]
        batch: list[tuple[float, np.ndarray]] = []
        for keep, reward in zip(keeps, rewards, strict=True):
            batch.append((reward, problem.ratios_for(keep)))
            if best is None or reward > best[0]:
                best = (reward, keep)
        _, top_ratios = max(batch, key=lambda b: b[0])
        mean = mean + s.lr * (top_ratios - mean)  # policy update toward the best sample
        sigma *= s.sigma_decay
    assert best is not None
    return best[1], mean


def _score(
    evaluator: BudgetedEvaluator, problem: PruningProblem, original: PruningProblem, keep: np.ndarray
) -> float:
    """Evaluate ``keep`` on ``problem`` and count it with the evaluator in the original problem's terms."""
    if problem is original:
        return evaluator.evaluate_keep(keep)[1]
    if evaluator.remaining <= 0:  # check before spending a proxy evaluation
        raise BudgetExhausted(f"evaluation budget of {evaluator.budget_evals} spent")
    local = problem.evaluate_keep(keep)
    outcome = original.outcome(
        keep,
        accuracy=local.accuracy,
        loss=local.loss,
        eval_seconds=local.eval_seconds,
        memo_hit=local.memo_hit,
    )
    return evaluator.record(outcome)
