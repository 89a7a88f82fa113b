"""SeerNet's search: a learned accuracy predictor, uncertainty-driven sampling, then gradient ascent.

SeerNet (Wang et al., 2023: a learned performance predictor for pruning policies):
(1) train a small MLP that predicts a pruned network's accuracy from
its per-layer ratios on the policies evaluated so far; (2) choose which policies to evaluate next with an
evolutionary search over the predictor that favours *uncertain* predictions (the predictor learns most
where it knows least); (3) finally run gradient ascent on the predicted accuracy with respect to the
ratios, under a log-barrier that keeps the MACs below the target, and evaluate the result.

Uncertainty comes from a small bootstrap ensemble of MLPs (mean and spread of their predictions), and the
acquisition is UCB: mean + κ·std. The MACs of a policy are a differentiable function of its ratios because
the cost model is bilinear in kept counts: ``kept = fixed + mult @ keep``, ``macs = Σ coef·kept[s1]·kept[s2]``
(:class:`TorchCost`). Gradient ascent uses momentum with an adaptive step (grow on success, halve and
retry on failure or leaving the feasible region); the final policy is projected onto the budget like
every other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from agents.evaluator import BudgetedEvaluator
from agents.registry import register_agent
from prune_env.problem import PruningProblem


@dataclass(frozen=True)
class PredictorSettings:
    """Hyper-parameters of :func:`predictor`."""

    init_fraction: float = 0.3  # share of the budget spent on random policies before the predictor
    ensemble: int = 5
    hidden: int = 32
    train_steps: int = 100
    train_lr: float = 1e-2
    weight_decay: float = 1e-4
    kappa: float = 2.0  # UCB weight on the ensemble's spread (uncertainty)
    candidates: int = 64  # population of the evolutionary acquisition search
    generations: int = 4
    mutation_sigma: float = 0.1  # Gaussian mutation of ratios
    ascent_steps: int = 200
    ascent_lr: float = 0.02
    momentum: float = 0.9
    barrier: float = 0.01  # weight of the log-barrier on the cost constraint


class TorchCost(nn.Module):
    """The problem's constrained cost (MACs or params) as a fraction of the base, differentiable in ratios.

    Mirrors :class:`prune_env.costs.CostModel` (bilinear in kept counts) with continuous kept counts
    ``channels · (1 - ratio)``, i.e. before rounding.
    """

    mult: torch.Tensor
    fixed: torch.Tensor
    channels: torch.Tensor
    coef: torch.Tensor

    def __init__(self, problem: PruningProblem) -> None:
        super().__init__()
        costs = problem.graph.costs
        # CostModel keeps its compiled terms private; they are exactly what a torch version needs.
        coef, s1, s2 = costs.compiled_terms(problem.metric)
        self.register_buffer("mult", torch.tensor(costs.mult, dtype=torch.float64))
        self.register_buffer("fixed", torch.tensor(costs.fixed, dtype=torch.float64))
        self.register_buffer("channels", torch.tensor(problem.units, dtype=torch.float64))
        self.register_buffer("coef", torch.tensor(coef, dtype=torch.float64))
        self.s1 = torch.as_tensor(s1, dtype=torch.long)
        self.s2 = torch.as_tensor(s2, dtype=torch.long)
        self.base = float(problem.projector.base_cost)

    def forward(self, ratios: torch.Tensor) -> torch.Tensor:
        keep = self.channels * (1.0 - ratios.to(torch.float64))
        kept = self.fixed + keep @ self.mult.T
        kept = torch.cat([kept, torch.ones_like(kept[..., :1])], dim=-1)
        return (kept[..., self.s1] * kept[..., self.s2]) @ self.coef / self.base


class Ensemble(nn.Module):
    """A bootstrap ensemble of small tanh MLPs mapping ratios (scaled to [0, 1]) to standardised reward.

    The members' weights are stacked and evaluated with batched matrix products, so the whole ensemble
    trains in one optimiser step (members differ by initialisation and bootstrap resample).
    """

    def __init__(self, n_in: int, members: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()

        def init(*shape: int) -> nn.Parameter:  # PyTorch's default Linear init, from the agent's generator
            bound = 1.0 / shape[-2] ** 0.5
            return nn.Parameter(torch.rand(members, *shape, generator=generator) * 2 * bound - bound)

        self.w1 = init(n_in, hidden)
        self.w2, self.w3 = init(hidden, hidden), init(hidden, 1)
        self.b1 = nn.Parameter(torch.zeros(members, 1, hidden))
        self.b2 = nn.Parameter(torch.zeros(members, 1, hidden))
        self.b3 = nn.Parameter(torch.zeros(members, 1, 1))

    def per_member(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape (members, batch, n_in) -> predictions (members, batch)."""
        h = torch.tanh(x @ self.w1 + self.b1)
        h = torch.tanh(h @ self.w2 + self.b2)
        return (h @ self.w3 + self.b3).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's prediction for the same inputs ``x`` (batch, n_in): shape (members, batch)."""
        return self.per_member(x.unsqueeze(0).expand(self.w1.shape[0], *x.shape))


def _fit(
    model: Ensemble, x: torch.Tensor, y: torch.Tensor, s: PredictorSettings, generator: torch.Generator
) -> None:
    members = model.w1.shape[0]
    idx = torch.randint(
        len(x), (members, len(x)), generator=generator
    )  # bootstrap: members disagree off-data
    xb, yb = x[idx], y[idx]
    opt = torch.optim.Adam(model.parameters(), lr=s.train_lr, weight_decay=s.weight_decay, foreach=True)
    for _ in range(s.train_steps):
        loss = ((model.per_member(xb) - yb) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@register_agent("predictor", PredictorSettings)
def predictor(evaluator: BudgetedEvaluator, rng: np.random.Generator, s: PredictorSettings) -> None:
    """SeerNet: predictor-guided search (random init, UCB evolution, barrier gradient ascent at the end).

    See :class:`PredictorSettings` for the settings.
    """
    problem = evaluator.problem
    n, max_ratio = problem.n_groups, problem.max_ratio
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    seen: dict[tuple[int, ...], float] = {}

    def evaluate(keep: np.ndarray) -> None:
        seen[tuple(keep.tolist())] = evaluator.evaluate_keep(keep)[1]

    # 1. Initial samples: the uniform policy and random ones (projected onto the budget).
    evaluate(problem.uniform_keep())
    n_init = max(2, round(s.init_fraction * evaluator.budget_evals))
    # They do not depend on scores: one batch (scored in parallel when the evaluator has workers).
    initial: dict[tuple[int, ...], np.ndarray] = {}
    while len(seen) + len(initial) < n_init and evaluator.remaining - len(initial) > 1:
        keep = problem.keep_for(rng.uniform(0.0, max_ratio, n))
        key = tuple(keep.tolist())
        if key not in seen and key not in initial:
            initial[key] = keep
    for key, (_, reward) in zip(initial, evaluator.evaluate_keeps(list(initial.values())), strict=True):
        seen[key] = reward

    model = Ensemble(n, s.ensemble, s.hidden, generator)

    def train() -> tuple[float, float]:
        keys = list(seen)
        x = torch.tensor(
            np.array([problem.ratios_for(np.array(k)) for k in keys]) / max_ratio, dtype=torch.float32
        )
        y = np.array([seen[k] for k in keys])
        mu, sd = float(y.mean()), float(y.std()) or 1.0
        _fit(model, x, torch.tensor((y - mu) / sd, dtype=torch.float32), s, generator)
        return mu, sd

    # 2. Uncertainty-driven evolution: evaluate the unevaluated candidate with the highest UCB.
    while evaluator.remaining > 1:
        train()
        candidate = _acquire(problem, model, seen, rng, s)
        if candidate is None:
            break
        evaluate(candidate)

    # 3. Gradient ascent on predicted reward under a log-barrier on the cost, then evaluate that policy.
    train()
    final: np.ndarray | None = _ascend(problem, model, seen, s)
    if final is not None and tuple(final.tolist()) in seen:
        final = _acquire(problem, model, seen, rng, s)  # nothing new found: the best UCB instead
    if final is not None:
        evaluate(final)


def _acquire(
    problem: PruningProblem,
    model: Ensemble,
    seen: dict[tuple[int, ...], float],
    rng: np.random.Generator,
    s: PredictorSettings,
) -> np.ndarray | None:
    """Evolve ratio vectors on the predictor's UCB; return the best one not evaluated yet."""
    n, max_ratio = problem.n_groups, problem.max_ratio
    elite = [problem.ratios_for(np.array(k)) for k, _ in sorted(seen.items(), key=lambda kv: -kv[1])[:8]]
    pop = np.clip(
        np.array([elite[i % len(elite)] for i in range(s.candidates)])
        + rng.normal(0, s.mutation_sigma, (s.candidates, n)),
        0.0,
        max_ratio,
    )
    best: tuple[float, np.ndarray] | None = None
    for _ in range(s.generations):
        keeps = np.array([problem.keep_for(r) for r in pop])
        ratios = np.array([problem.ratios_for(k) for k in keeps])
        with torch.no_grad():
            preds = model(torch.tensor(ratios / max_ratio, dtype=torch.float32)).numpy()
        ucb = preds.mean(0) + s.kappa * preds.std(0)
        for i in np.argsort(-ucb):
            if tuple(keeps[i].tolist()) not in seen:
                if best is None or ucb[i] > best[0]:
                    best = (float(ucb[i]), keeps[i])
                break
        # Next generation: mutate the top half and cross it over uniformly.
        top = ratios[np.argsort(-ucb)[: max(2, s.candidates // 2)]]
        a, b = top[rng.integers(len(top), size=s.candidates)], top[rng.integers(len(top), size=s.candidates)]
        pop = np.where(rng.random((s.candidates, n)) < 0.5, a, b) + rng.normal(
            0, s.mutation_sigma / 2, (s.candidates, n)
        )
        pop = np.clip(pop, 0.0, max_ratio)
    return None if best is None else best[1]


def _ascend(
    problem: PruningProblem, model: Ensemble, seen: dict[tuple[int, ...], float], s: PredictorSettings
) -> np.ndarray:
    """Momentum gradient ascent with an adaptive step on ``mean prediction + barrier·log(target - cost)``."""
    cost = TorchCost(problem)
    target, max_ratio = problem.target, problem.max_ratio
    best_key = max(seen, key=lambda k: seen[k])
    # Start strictly inside the feasible region (the barrier is infinite on its boundary).
    start = problem.ratios_for(problem.keep_for(problem.ratios_for(np.array(best_key)), target * 0.97))
    r = torch.tensor(start, dtype=torch.float64)

    def objective(x: torch.Tensor) -> torch.Tensor:
        slack = target - cost(x)
        if slack <= 0:
            return torch.tensor(-np.inf, dtype=torch.float64)
        pred = model((x / max_ratio).to(torch.float32).unsqueeze(0)).mean().to(torch.float64)
        return pred + s.barrier * torch.log(slack)

    lr, velocity = s.ascent_lr, torch.zeros_like(r)
    for _ in range(s.ascent_steps):
        x = r.clone().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value, x)
        velocity = s.momentum * velocity + grad
        candidate = (r + lr * velocity).clamp(0.0, max_ratio)
        with torch.no_grad():
            if float(objective(candidate)) >= float(value):
                r, lr = candidate, lr * 1.1  # success: accept and take bigger steps
            else:
                velocity.zero_()  # overshoot or infeasible: reset momentum, halve the step
                lr *= 0.5
        if lr < 1e-6:
            break
    return problem.keep_for(r.detach().numpy())
