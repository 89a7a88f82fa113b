"""MetaPruning's evolutionary search over per-group channel counts.

MetaPruning (Liu et al., 2019, "MetaPruning: Meta Learning for Automatic Neural Network Channel
Pruning") searches *pruned network encoding vectors* — the number of channels kept in each layer — with
an evolutionary algorithm: a random initial population, top-k selection, mutation and crossover, and
rejection of candidates that violate the FLOPs constraint; every candidate is scored by the PruningNet's
weights (here: our proxy). Genomes already evaluated are not scored again.

Here a genome is the kept-units vector of the groups. Every candidate is projected onto the cost target
(so none exceeds it) and rejected if projection left it far *below* the target (cost < ``min_fill`` ×
target: wasted budget, which MetaPruning's band constraint also rules out). A cache maps genomes to their
reward: a cache hit costs no budget, and duplicates are never proposed for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from agents.evaluator import BudgetedEvaluator
from agents.registry import register_agent
from prune_env.errors import InvalidSettingError
from prune_env.problem import PruningProblem
from prune_env.quantization.bits import BIT_CHOICES


@dataclass(frozen=True)
class EvolutionSettings:
    """Hyper-parameters of :func:`evolution` (MetaPruning used population 50, top-k 10, 20 iterations).

    ``population`` and ``top_k`` default to ``None``: sized to the evaluation budget, MetaPruning's 50 and 10
    at 1,000 evaluations (population ``budget // 20`` within 16..50, top-k a fifth of it, at least 6), so a
    100-evaluation search keeps several generations of 16 and a 2,000-evaluation one runs 40 of 50. The
    population is always capped at a third of the budget.
    """

    population: int | None = None
    top_k: int | None = None
    mutation_prob: float = 0.1  # per-gene probability
    mutation_share: float = 0.5  # fraction of children made by mutation (the rest by crossover)
    min_fill: float = 0.9  # reject candidates whose cost is below this fraction of the target
    max_tries: int = 200  # attempts to draw a new, valid child before accepting any new one

    def __post_init__(self) -> None:
        for name in ("population", "top_k"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 2
            ):
                raise InvalidSettingError(
                    f"evolution {name} must be an integer >= 2 (or None: sized to the budget), got {value!r}"
                )

    def sizes(self, budget: int) -> tuple[int, int]:
        """(population, top-k) for a search of ``budget`` evaluations."""
        population = self.population if self.population is not None else min(50, max(16, budget // 20))
        population = max(2, min(population, budget // 3 or 1))
        top_k = self.top_k if self.top_k is not None else max(6, population // 5)
        return population, max(2, top_k)


class _Channels:
    """Genomes of kept channels per group (the problem's policies choose channels only)."""

    def __init__(self, problem: PruningProblem) -> None:
        self.problem = problem
        self.low, self.high = problem.projector.min_keep, problem.units

    def project(self, genome: np.ndarray) -> np.ndarray:
        p = self.problem
        return p.keep_for(p.ratios_for(np.clip(genome, self.low, self.high)))

    def random(self, rng: np.random.Generator) -> np.ndarray:
        return self.problem.keep_for(rng.uniform(0.0, self.problem.max_ratio, self.problem.n_groups))

    def uniform(self) -> np.ndarray:
        return self.problem.uniform_keep()

    def cost_ratio(self, genome: np.ndarray) -> float:
        return self.problem.projector.cost_ratio(genome)

    def score(self, evaluator: BudgetedEvaluator, genomes: list[np.ndarray]) -> list[float]:
        return [reward for _, reward in evaluator.evaluate_keeps(genomes)]


class _Joint(_Channels):
    """Genomes of joint policies: kept channels, then each group's weight-bit and activation-bit choices
    (indices into BIT_CHOICES), so mutation and crossover act on bits as on channels."""

    def __init__(self, problem: PruningProblem) -> None:
        super().__init__(problem)
        n, top = problem.n_groups, len(BIT_CHOICES) - 1
        self.n = n
        self.low = np.concatenate([problem.projector.min_keep, np.zeros(2 * n, dtype=np.int64)])
        self.high = np.concatenate([problem.units, np.full(2 * n, top, dtype=np.int64)])
        self.choices = np.asarray(BIT_CHOICES, dtype=np.int64)

    def split(self, genome: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.n
        return genome[:n], self.choices[genome[n : 2 * n]], self.choices[genome[2 * n :]]

    def join(self, keep: np.ndarray, weight_bits: np.ndarray, activation_bits: np.ndarray) -> np.ndarray:
        index = {b: i for i, b in enumerate(BIT_CHOICES)}
        bits = [index[int(b)] for b in (*weight_bits, *activation_bits)]
        return np.concatenate([np.asarray(keep, dtype=np.int64), np.asarray(bits, dtype=np.int64)])

    def project(self, genome: np.ndarray) -> np.ndarray:
        keep, w, a = self.split(np.clip(genome, self.low, self.high))
        return self.join(*self.problem.joint_keep_for(self.problem.ratios_for(keep), w, a))

    def random(self, rng: np.random.Generator) -> np.ndarray:
        p, n = self.problem, self.n
        ratios = rng.uniform(0.0, p.max_ratio, n)
        return self.join(*p.joint_keep_for(ratios, rng.choice(self.choices, n), rng.choice(self.choices, n)))

    def uniform(self) -> np.ndarray:
        bits = np.full(self.n, self.problem.settings.other_bits)
        return self.join(*self.problem.joint_keep_for(np.zeros(self.n), bits, bits))

    def cost_ratio(self, genome: np.ndarray) -> float:
        keep, w, a = self.split(genome)
        joint = self.problem.joint
        assert joint is not None  # a joint genome belongs to a joint problem
        return joint.projector.cost_ratio(keep, w, a) if joint.constrained else super().cost_ratio(keep)

    def score(self, evaluator: BudgetedEvaluator, genomes: list[np.ndarray]) -> list[float]:
        return [evaluator.evaluate_joint_keep(*self.split(g))[1] for g in genomes]


def _mutate(
    parents: list[np.ndarray], low: np.ndarray, high: np.ndarray, prob: float, rng: np.random.Generator
) -> np.ndarray:
    """A random parent with each gene redrawn uniformly in [min_keep, channels] with probability ``prob``."""
    child = parents[rng.integers(len(parents))].copy()
    genes = rng.random(len(child)) < prob
    if not genes.any():
        genes[rng.integers(len(child))] = True  # always change something
    child[genes] = rng.integers(low[genes], high[genes] + 1)
    return child


def _crossover(parents: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Uniform crossover of two distinct parents."""
    i, j = rng.choice(len(parents), size=2, replace=False)
    return np.where(rng.random(len(parents[i])) < 0.5, parents[i], parents[j])


@register_agent("evolution", EvolutionSettings, joint_policies=True)
def evolution(evaluator: BudgetedEvaluator, rng: np.random.Generator, s: EvolutionSettings) -> None:
    """MetaPruning's evolution: population of kept-channel vectors, top-k, mutation, crossover, cache.

    See :class:`EvolutionSettings` for the settings.
    """
    problem = evaluator.problem
    genomes = _Channels(problem) if problem.joint is None else _Joint(problem)
    low, high = genomes.low, genomes.high
    cache: dict[tuple[int, ...], float] = {}
    pop_size, top_k = s.sizes(evaluator.budget_evals)

    def propose(make: Callable[[], np.ndarray], taken: dict[tuple[int, ...], None]) -> None:
        """Add to ``taken`` a new, valid genome from ``make()``; after ``max_tries`` any new one (then
        any one). New: neither scored (``cache``) nor proposed earlier in this generation (``taken``)."""
        fallback = None
        for _ in range(s.max_tries):
            child = genomes.project(make())
            key = tuple(child.tolist())
            if key in cache or key in taken:
                continue
            if genomes.cost_ratio(child) >= s.min_fill * problem.target:
                taken[key] = None
                return
            fallback = child if fallback is None else fallback
        child = fallback if fallback is not None else genomes.random(rng)
        taken[tuple(child.tolist())] = None

    def score(generation: dict[tuple[int, ...], None]) -> None:
        """Score a generation's new genomes as one batch (in parallel when the evaluator has workers);
        a genome already in the cache costs no budget."""
        new = [key for key in generation if key not in cache]
        batch = [np.array(key, dtype=np.int64) for key in new]
        for key, reward in zip(new, genomes.score(evaluator, batch), strict=True):
            cache[key] = reward

    # The uniform policy seeds the population: evolution then starts no worse than the baseline.
    initial: dict[tuple[int, ...], None] = {tuple(genomes.uniform().tolist()): None}
    for _ in range(pop_size * 4):
        if len(initial) >= pop_size:
            break
        propose(lambda: genomes.random(rng), initial)
    score(initial)

    while True:
        before = len(cache)
        ranked = sorted(cache.items(), key=lambda kv: -kv[1])[:top_k]
        parents = [np.array(k, dtype=np.int64) for k, _ in ranked]
        n_mut = max(1, round(pop_size * s.mutation_share))

        mutate = partial(_mutate, parents, low, high, s.mutation_prob, rng)
        crossover = partial(_crossover, parents, rng)
        generation: dict[tuple[int, ...], None] = {}
        for c in range(pop_size):
            propose(mutate if c < n_mut else crossover, generation)
        score(generation)
        if len(cache) == before:  # the reachable space is exhausted: stop rather than loop forever
            return
