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

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.evaluator import BudgetedEvaluator
from agents.policies import (
    POLICY_META,
    check_format,
    check_target_in_range,
    load_tensors_into,
    meta_field,
    ratio_list,
    read_tensors,
    refuse,
    trained_range,
    write_policy,
)
from agents.registry import register_agent
from prune_env.errors import InvalidSettingError
from prune_env.problem import PruningProblem
from prune_env.quantization.bits import BIT_CHOICES
from prune_env.validation import as_int, as_real


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


class JointTorchCost(nn.Module):
    """A joint policy's BitOps (or size) as a fraction of the unpruned model's at 32 bits, differentiable in
    ratios and in continuous bit-widths: :class:`TorchCost` with each term weighted by the bits of the
    layer it counts (its group's, ``other_bits`` outside every group, 32 for what is never quantized)."""

    mult: torch.Tensor
    fixed: torch.Tensor
    channels: torch.Tensor
    coef: torch.Tensor
    fixed_bits: torch.Tensor

    def __init__(self, problem: PruningProblem) -> None:
        super().__init__()
        joint = problem.joint
        assert joint is not None and joint.constrained  # a joint budget is what this cost constrains
        costs = problem.graph.costs
        metric = "macs" if problem.metric == "bitops" else "params"
        coef, s1, s2 = costs.compiled_terms(metric)
        groups, fixed_bits = joint.projector.term_bits(metric)  # the bits weighing each term
        self.register_buffer("mult", torch.tensor(costs.mult, dtype=torch.float64))
        self.register_buffer("fixed", torch.tensor(costs.fixed, dtype=torch.float64))
        self.register_buffer("channels", torch.tensor(problem.units, dtype=torch.float64))
        self.register_buffer("coef", torch.tensor(coef, dtype=torch.float64))
        self.register_buffer("fixed_bits", torch.as_tensor(fixed_bits, dtype=torch.float64))
        self.s1, self.s2 = torch.as_tensor(s1, dtype=torch.long), torch.as_tensor(s2, dtype=torch.long)
        self.group = torch.as_tensor(groups, dtype=torch.long)
        self.activations = metric == "macs"  # BitOps weigh MACs by both widths, size by the weights' only
        self.base = float(joint.base_bitops if metric == "macs" else joint.base_size_bits)

    def forward(
        self, ratios: torch.Tensor, weight_bits: torch.Tensor, activation_bits: torch.Tensor
    ) -> torch.Tensor:
        keep = self.channels * (1.0 - ratios.to(torch.float64))
        kept = torch.cat([self.fixed + keep @ self.mult.T, torch.ones(1, dtype=torch.float64)])
        grouped = self.group >= 0
        index = self.group.clamp(min=0)
        w = torch.where(grouped, weight_bits.to(torch.float64)[index], self.fixed_bits)
        bits = (
            w * torch.where(grouped, activation_bits.to(torch.float64)[index], self.fixed_bits)
            if self.activations
            else w
        )
        return (kept[self.s1] * kept[self.s2] * bits) @ self.coef / self.base


def continuous_bits(unit: torch.Tensor) -> torch.Tensor:
    """Bit-widths for values in [0, 1], piecewise linear through each choice at the centre of its share of
    the interval (where :meth:`JointPolicies.bits_for` maps to it): a differentiable relaxation."""
    choices = torch.tensor(BIT_CHOICES, dtype=torch.float64)
    position = (unit.to(torch.float64) * len(BIT_CHOICES) - 0.5).clamp(0.0, len(BIT_CHOICES) - 1.0)
    low = position.floor().long().clamp(max=len(BIT_CHOICES) - 2)
    frac = position - low
    return choices[low] * (1.0 - frac) + choices[low + 1] * frac


class _Channels:
    """Policies as kept counts, searched in ratio space (the predictor's input: ratios / max_ratio)."""

    def __init__(self, problem: PruningProblem) -> None:
        self.problem = problem
        self.dim = problem.n_groups
        self.upper = np.full(self.dim, problem.max_ratio)

    def uniform(self) -> tuple[int, ...]:
        return tuple(self.problem.uniform_keep().tolist())

    def random(self, rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(self.problem.keep_for(rng.uniform(0.0, self.problem.max_ratio, self.dim)).tolist())

    def decode(self, x: np.ndarray, target: float | None = None) -> tuple[int, ...]:
        return tuple(self.problem.keep_for(x, target).tolist())

    def encode(self, key: tuple[int, ...]) -> np.ndarray:
        return self.problem.ratios_for(np.array(key))

    def score(self, evaluator: BudgetedEvaluator, keys: list[tuple[int, ...]]) -> list[float]:
        return [reward for _, reward in evaluator.evaluate_keeps([np.array(k) for k in keys])]

    def cost(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return TorchCost(self.problem)


class _Joint(_Channels):
    """Joint policies: ratios, then each group's weight and activation bits as values in [0, 1]
    (:meth:`JointPolicies.bits_for`); a key is the kept counts followed by both bit-widths."""

    def __init__(self, problem: PruningProblem) -> None:
        super().__init__(problem)
        self.n = problem.n_groups
        self.dim = 3 * self.n
        self.upper = np.concatenate([np.full(self.n, problem.max_ratio), np.ones(2 * self.n)])
        self.unit = {b: (i + 0.5) / len(BIT_CHOICES) for i, b in enumerate(BIT_CHOICES)}

    def _key(self, policy: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, ...]:
        return tuple(int(v) for part in policy for v in part)

    def uniform(self) -> tuple[int, ...]:
        bits = np.full(self.n, self.problem.settings.other_bits)
        return self._key(self.problem.joint_keep_for(np.zeros(self.n), bits, bits))

    def random(self, rng: np.random.Generator) -> tuple[int, ...]:
        return self.decode(
            np.concatenate([rng.uniform(0.0, self.problem.max_ratio, self.n), rng.random(2 * self.n)])
        )

    def decode(self, x: np.ndarray, target: float | None = None) -> tuple[int, ...]:
        p, n = self.problem, self.n
        assert p.joint is not None
        bits = p.joint.bits_for
        return self._key(p.joint_keep_for(x[:n], bits(x[n : 2 * n]), bits(x[2 * n :]), target))

    def encode(self, key: tuple[int, ...]) -> np.ndarray:
        n = self.n
        units = [self.unit[b] for b in key[n:]]
        return np.concatenate([self.problem.ratios_for(np.array(key[:n])), units])

    def score(self, evaluator: BudgetedEvaluator, keys: list[tuple[int, ...]]) -> list[float]:
        n = self.n
        return [
            evaluator.evaluate_joint_keep(np.array(k[:n]), np.array(k[n : 2 * n]), np.array(k[2 * n :]))[1]
            for k in keys
        ]

    def cost(self) -> Callable[[torch.Tensor], torch.Tensor]:
        joint = self.problem.joint
        assert joint is not None
        n = self.n
        if not joint.constrained:  # bits are free, MACs or parameters constrain the ratios alone
            channels = TorchCost(self.problem)
            return lambda x: channels(x[:n])
        bitops = JointTorchCost(self.problem)
        return lambda x: bitops(x[:n], continuous_bits(x[n : 2 * n]), continuous_bits(x[2 * n :]))


PREDICTOR_FILE = "predictor.pt"


@dataclass
class PredictorPolicy:
    """SeerNet's trained accuracy predictor as a pruning policy: for any target it repeats the search's last
    step — gradient ascent on the predicted accuracy under a log-barrier on that target's cost, from the best
    allocation evaluated — with no evaluation. The predictor learned from policies at the searched target,
    so far from it the ascent follows an extrapolation.

    ``save(directory)`` writes ``policy.json`` and the ensemble's weights, ``predictor.pt``; :meth:`load`
    reads them back.
    """

    settings: PredictorSettings
    model: Ensemble
    start_ratios: tuple[float, ...]
    budget_range: tuple[float, float] | None = None

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray:
        """Kept units per group at ``target`` (default: the problem's), within it by construction."""
        if problem.n_groups != len(self.start_ratios) or problem.joint is not None:
            raise InvalidSettingError(
                f"this predictor reads {len(self.start_ratios)} pruning ratios; the problem has "
                f"{problem.n_groups} channel groups{' and joint policies' if problem.joint else ''}: apply "
                "it to the problem (model and dataset) it was searched on"
            )
        goal = check_target_in_range(self.budget_range, problem, target, "predictor")
        problem.check_target(goal)
        policies = _Channels(problem)
        return np.array(_ascend(policies, self.model, np.array(self.start_ratios), self.settings, goal))

    def save(self, directory: str | Path) -> Path:
        meta = {"settings": asdict(self.settings), "start_ratios": list(self.start_ratios)}
        return write_policy(directory, "predictor", meta, self.budget_range, (PREDICTOR_FILE, self.model))

    @classmethod
    def from_meta(cls, directory: str | Path, meta: Mapping[str, Any]) -> PredictorPolicy:
        """The predictor ``directory/policy.json`` (already read as ``meta``) describes, with its weights."""
        path = Path(directory)
        file = path / POLICY_META
        check_format(meta, file, required=False)
        settings = _settings_from_meta(meta, file)
        ratios = ratio_list(meta, "start_ratios", file)
        span = trained_range(meta, file)
        weights = path / PREDICTOR_FILE
        state = read_tensors(weights, "predictor weights file")
        n, e, h = len(ratios), settings.ensemble, settings.hidden
        shapes = {
            "w1": (e, n, h),
            "w2": (e, h, h),
            "w3": (e, h, 1),
            "b1": (e, 1, h),
            "b2": (e, 1, h),
            "b3": (e, 1, 1),
        }
        # Checked before building: policy.json's settings could ask for any size (a million hidden units
        # is terabytes), while the saved tensors' shapes bound the ensemble to the size of the file.
        missing = [name for name in shapes if name not in state]
        if missing:
            refuse(weights, f"the ensemble's tensors {', '.join(map(repr, missing))} are absent")
        for name, shape in shapes.items():
            if tuple(state[name].shape) != shape:
                refuse(
                    file,
                    f"its settings and start_ratios describe an ensemble ({e} members, {h} hidden units, "
                    f"{n} ratios) whose tensor {name!r} has shape {list(shape)}, but {weights.name} holds "
                    f"{list(state[name].shape)}",
                )
        model = Ensemble(n, e, h, torch.Generator())
        load_tensors_into(model, state, weights)
        return cls(settings, model.eval(), ratios, span)


# Larger counts in a saved predictor's settings are no search's: they would only make applying it hang.
MAX_SAVED_COUNT = 1_000_000


def _settings_from_meta(meta: Mapping[str, Any], file: Path) -> PredictorSettings:
    """The :class:`PredictorSettings` in a policy file, each value of its field's type and range."""
    saved = meta_field(
        meta, "settings", file, "an object of predictor settings", lambda v: isinstance(v, dict)
    )
    known = {f.name: f for f in fields(PredictorSettings)}
    unknown = sorted(set(saved) - set(known))
    if unknown:
        refuse(file, f"unknown predictor settings {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in saved.items():
        try:
            if isinstance(getattr(PredictorSettings, name), int):
                count = as_int(f"settings.{name}", value)
                least = 1 if name in ("ensemble", "hidden") else 0
                if not least <= count <= MAX_SAVED_COUNT:
                    refuse(
                        file,
                        f"settings.{name} must be an integer in [{least}, {MAX_SAVED_COUNT}], got {count}",
                    )
                values[name] = count
            else:
                values[name] = as_real(f"settings.{name}", value)
        except InvalidSettingError as exc:
            if str(exc).startswith(str(file)):
                raise
            refuse(file, str(exc))
    return PredictorSettings(**values)


# Its gradient ascent needs the cost as a bilinear torch function (TorchCost); a latency table is not one.
@register_agent("predictor", PredictorSettings, joint_policies=True, latency_budget=False)
def predictor(
    evaluator: BudgetedEvaluator, rng: np.random.Generator, s: PredictorSettings
) -> PredictorPolicy | None:
    """SeerNet: predictor-guided search (random init, UCB evolution, barrier gradient ascent at the end).

    With joint policies (pruning + quantization) the predictor reads the ratios and each group's bits,
    and the ascent's barrier is on the BitOps (or size) of continuously relaxed bit-widths, as SeerNet
    searches its pruning and quantization policy. See :class:`PredictorSettings` for the settings.
    """
    problem = evaluator.problem
    policies = _Channels(problem) if problem.joint is None else _Joint(problem)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    seen: dict[tuple[int, ...], float] = {}

    def evaluate(key: tuple[int, ...]) -> None:
        seen[key] = policies.score(evaluator, [key])[0]

    # 1. Initial samples: the uniform policy and random ones (projected onto the budget).
    evaluate(policies.uniform())
    n_init = max(2, round(s.init_fraction * evaluator.budget_evals))
    # They do not depend on scores: one batch (scored in parallel when the evaluator has workers).
    initial: dict[tuple[int, ...], None] = {}
    while len(seen) + len(initial) < n_init and evaluator.remaining - len(initial) > 1:
        key = policies.random(rng)
        if key not in seen and key not in initial:
            initial[key] = None
    for key, reward in zip(initial, policies.score(evaluator, list(initial)), strict=True):
        seen[key] = reward

    model = Ensemble(policies.dim, s.ensemble, s.hidden, generator)

    def train() -> tuple[float, float]:
        keys = list(seen)
        x = torch.tensor(np.array([policies.encode(k) for k in keys]) / policies.upper, dtype=torch.float32)
        y = np.array([seen[k] for k in keys])
        mu, sd = float(y.mean()), float(y.std()) or 1.0
        _fit(model, x, torch.tensor((y - mu) / sd, dtype=torch.float32), s, generator)
        return mu, sd

    # 2. Uncertainty-driven evolution: evaluate the unevaluated candidate with the highest UCB.
    while evaluator.remaining > 1:
        train()
        candidate = _acquire(policies, model, seen, rng, s)
        if candidate is None:
            break
        evaluate(candidate)

    # 3. Gradient ascent on predicted reward under a log-barrier on the cost, then evaluate that policy.
    train()
    best = policies.encode(max(seen, key=lambda k: seen[k]))
    final: tuple[int, ...] | None = _ascend(policies, model, best, s, problem.target)
    if final is not None and final in seen:
        final = _acquire(policies, model, seen, rng, s)  # nothing new found: the best UCB instead
    if final is not None:
        evaluate(final)
    if problem.joint is not None:
        return None
    best = policies.encode(max(seen, key=lambda k: seen[k]))
    return PredictorPolicy(s, model.eval(), tuple(float(r) for r in best), evaluator.budget_range)


def _acquire(
    policies: _Channels,
    model: Ensemble,
    seen: dict[tuple[int, ...], float],
    rng: np.random.Generator,
    s: PredictorSettings,
) -> tuple[int, ...] | None:
    """Evolve policies (in their search space) on the predictor's UCB; return the best one not evaluated."""
    dim, upper = policies.dim, policies.upper
    elite = [policies.encode(k) for k, _ in sorted(seen.items(), key=lambda kv: -kv[1])[:8]]
    pop = np.clip(
        np.array([elite[i % len(elite)] for i in range(s.candidates)])
        + rng.normal(0, s.mutation_sigma, (s.candidates, dim)),
        0.0,
        upper,
    )
    best: tuple[float, tuple[int, ...]] | None = None
    for _ in range(s.generations):
        keys = [policies.decode(x) for x in pop]
        points = np.array([policies.encode(k) for k in keys])
        with torch.no_grad():
            preds = model(torch.tensor(points / upper, dtype=torch.float32)).numpy()
        ucb = preds.mean(0) + s.kappa * preds.std(0)
        for i in np.argsort(-ucb):
            if keys[i] not in seen:
                if best is None or ucb[i] > best[0]:
                    best = (float(ucb[i]), keys[i])
                break
        # Next generation: mutate the top half and cross it over uniformly.
        top = points[np.argsort(-ucb)[: max(2, s.candidates // 2)]]
        a, b = top[rng.integers(len(top), size=s.candidates)], top[rng.integers(len(top), size=s.candidates)]
        pop = np.where(rng.random((s.candidates, dim)) < 0.5, a, b) + rng.normal(
            0, s.mutation_sigma / 2, (s.candidates, dim)
        )
        pop = np.clip(pop, 0.0, upper)
    return None if best is None else best[1]


def _ascend(
    policies: _Channels, model: Ensemble, best: np.ndarray, s: PredictorSettings, target: float
) -> tuple[int, ...]:
    """Momentum gradient ascent with an adaptive step on ``mean prediction + barrier·log(target - cost)``,
    from the allocation ``best`` (a point of the search space); the result is projected onto ``target``."""
    cost = policies.cost()
    upper = torch.tensor(policies.upper, dtype=torch.float64)
    # Start strictly inside the feasible region (the barrier is infinite on its boundary).
    start = policies.encode(policies.decode(best, target * 0.97))
    r = torch.tensor(start, dtype=torch.float64)

    def objective(x: torch.Tensor) -> torch.Tensor:
        slack = target - cost(x)
        if slack <= 0:
            return torch.tensor(-np.inf, dtype=torch.float64)
        pred = model((x / upper).to(torch.float32).unsqueeze(0)).mean().to(torch.float64)
        return pred + s.barrier * torch.log(slack)

    lr, velocity = s.ascent_lr, torch.zeros_like(r)
    for _ in range(s.ascent_steps):
        x = r.clone().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value, x)
        velocity = s.momentum * velocity + grad
        candidate = torch.minimum(torch.clamp(r + lr * velocity, min=0.0), upper)
        with torch.no_grad():
            if float(objective(candidate)) >= float(value):
                r, lr = candidate, lr * 1.1  # success: accept and take bigger steps
            else:
                velocity.zero_()  # overshoot or infeasible: reset momentum, halve the step
                lr *= 0.5
        if lr < 1e-6:
            break
    return policies.decode(r.detach().numpy(), target)
