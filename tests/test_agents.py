"""The search agents: every one runs end to end, never exceeds its budget, and is reproducible."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import prune_env
from agents import BudgetedEvaluator, BudgetExhausted, available, run_agent, search
from agents.amc import TruncatedNormalNoise
from agents.predictor import TorchCost
from agents.sb3 import make_env
from prune_env import UnknownNameError
from prune_env.problem import PruningProblem

BUDGET = 8
SB3 = ("ppo", "a2c", "sac", "td3", "ddpg", "amc")
AGENTS = available()
# Deterministic allocations spend a fixed number of evaluations whatever the budget; sensitivity needs more
# than these budgets (groups × ratios + 1) and is tested in test_allocation_baselines.py.
FIXED_EVALS = {"uniform", "global", "knapsack", "sensitivity"}
BUDGET_FILLING = sorted(set(AGENTS) - FIXED_EVALS)
SMALL_BUDGETS = sorted(set(AGENTS) - {"sensitivity"})


def _trace(result: Any) -> list[tuple]:
    return [(e.keep, round(e.reward, 12), round(e.macs_ratio, 12)) for e in result.history]


@pytest.mark.parametrize("name", SMALL_BUDGETS)
def test_agent_runs_within_budget(problem: PruningProblem, name: str) -> None:
    result = search(name, problem, BUDGET, seed=0)
    assert result.agent == name
    assert 1 <= len(result.history) <= BUDGET
    if name in BUDGET_FILLING:
        assert len(result.history) == BUDGET
    assert all(e.macs_ratio <= problem.target * (1 + 1e-9) for e in result.history)
    assert result.best_reward == max(e.reward for e in result.history)
    assert [e.index for e in result.history] == list(range(len(result.history)))


@pytest.mark.parametrize("name", ["random", "rlpruner", "evolution", "predictor", "ppo", "amc"])
def test_same_seed_same_history(problem: PruningProblem, name: str) -> None:
    first, second = (search(name, problem, 6, seed=3) for _ in range(2))
    assert _trace(first) == _trace(second)


def test_different_seeds_differ(problem: PruningProblem) -> None:
    assert _trace(search("random", problem, 4, seed=0)) != _trace(search("random", problem, 4, seed=1))


def test_sb3_layer_env_and_oneshot_amc(problem: PruningProblem) -> None:
    assert len(search("ppo", problem, 4, seed=0, env="layer").history) == 4
    assert len(search("amc", problem, 4, seed=0, env="oneshot").history) == 4


def test_rlpruner_rounds_share_the_budget(problem: PruningProblem) -> None:
    result = search("rlpruner", problem, 6, seed=0, rounds=2, kd_steps=2, samples=2)
    assert len(result.history) == 6
    assert all(e.macs_ratio <= problem.target * (1 + 1e-9) for e in result.history)
    # The second round prunes further than the first round's intermediate target sqrt(0.5).
    assert result.history[-1].macs_ratio <= problem.target * (1 + 1e-9)


def test_evaluator_refuses_one_more(problem: PruningProblem) -> None:
    evaluator = BudgetedEvaluator(problem, 2)
    for _ in range(2):
        evaluator.evaluate(np.zeros(problem.n_groups))
    with pytest.raises(BudgetExhausted):
        evaluator.evaluate(np.zeros(problem.n_groups))
    assert len(evaluator.history) == 2


@pytest.mark.parametrize("kind", ["oneshot", "layer"])
def test_env_wrapper_refuses_before_evaluating(problem: PruningProblem, kind: str) -> None:
    evaluator = BudgetedEvaluator(problem, 1)
    env = make_env(evaluator, kind)
    env.reset(seed=0)
    steps = 1 if kind == "oneshot" else problem.n_groups
    for _ in range(steps):
        *_, terminated, _, _ = env.step(env.action_space.sample())
    assert terminated and evaluator.used == 1
    env.reset()
    evaluations = problem.evaluations
    action = np.full(env.action_space.shape, 0.123, dtype=np.float32)  # a policy not evaluated before
    for _ in range(steps - 1):  # layer-wise steps before the last one do not evaluate
        env.step(action)
    with pytest.raises(BudgetExhausted):
        env.step(action)
    assert problem.evaluations == evaluations  # the proxy was not called
    assert evaluator.used == 1


def test_unknown_agent(problem: PruningProblem) -> None:
    with pytest.raises(UnknownNameError):
        run_agent("no-such-agent", BudgetedEvaluator(problem, 1))


def test_search_accepts_env_factory(problem: PruningProblem) -> None:
    from prune_env.env import OneShotPruneEnv

    result = search("random", lambda: OneShotPruneEnv(problem=problem), 2, seed=0)
    assert len(result.history) == 2


def test_torch_cost_matches_cost_model(problem: PruningProblem) -> None:
    rng = np.random.default_rng(0)
    keeps = np.array([problem.keep_for(rng.uniform(0, 0.8, problem.n_groups)) for _ in range(5)])
    ratios = torch.tensor(np.array([problem.ratios_for(k) for k in keeps]))
    expected = problem.graph.costs.macs_batch(keeps) / problem.projector.base_cost
    np.testing.assert_allclose(TorchCost(problem)(ratios).numpy(), expected, rtol=1e-9)


def test_truncated_noise_stays_in_bounds_and_decays() -> None:
    noise = TruncatedNormalNoise(sigma=1.0, rng=np.random.default_rng(0))
    samples = np.array([noise.perturb(np.array([0.95, -0.95])) for _ in range(200)])
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    noise.decay()
    assert noise.sigma == pytest.approx(0.95)
    assert set(SB3) <= set(AGENTS)


@pytest.mark.parametrize("name", ["ppo", "amc"])
def test_sb3_agents_leave_no_stray_log_directories(
    problem: PruningProblem, name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a TensorBoard directory nothing is written (SB3's default logger makes /tmp/SB3-<date>)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    search(name, problem, 3, seed=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["evolution", "random", "rlpruner", "ppo"])
def test_every_agent_writes_tensorboard_scalars(problem: PruningProblem, name: str, tmp_path: Any) -> None:
    """search(tensorboard_log=...) gives every agent, not only the SB3 learners, one TensorBoard point per
    evaluation of each search/ scalar; SB3 learners add their own logs in the same directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = search(name, problem, 4, seed=0, tensorboard_log=str(tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        f"search/{s}" for s in ("reward", "accuracy", "loss", "macs_ratio", "params_ratio", "best_reward")
    }
    assert expected <= tags
    rewards = [e.value for e in events.Scalars("search/reward")]
    assert rewards == pytest.approx([e.reward for e in result.history], rel=1e-6)
    best = [e.value for e in events.Scalars("search/best_reward")]
    assert best == pytest.approx(list(np.maximum.accumulate(rewards)), rel=1e-6)
    if name == "ppo":
        assert any(p.is_dir() for p in tmp_path.iterdir())  # SB3's own run directory beside ours


@pytest.mark.parametrize("name", SB3)
def test_budget_conditioned_agents_honour_the_range(problem: PruningProblem, name: str) -> None:
    """budget_range: every episode is scored at its own target drawn from the range, never over it, and
    the learner comes back as a policy that prunes for any target in the range without evaluating."""
    result = search(name, problem, 6, seed=0, budget_range=(0.3, 0.7))
    targets = [e.target for e in result.history]
    assert len(targets) == 6 and all(t is not None and 0.3 <= t <= 0.7 for t in targets)
    assert len({round(t, 6) for t in targets if t is not None}) > 1  # sampled, not one target
    assert all(e.macs_ratio <= e.target * (1 + 1e-9) for e in result.history if e.target is not None)
    before = problem.evaluations
    for target in (0.35, 0.5, 0.65):
        keep = result.policy.keep_for(problem, target)
        assert problem.projector.cost_ratio(keep) <= target * (1 + 1e-9)
        assert np.all((keep >= 1) & (keep <= problem.units))
    assert problem.evaluations == before  # applying a policy costs no evaluation


def test_a_saved_policy_reloads_and_decides_the_same(problem: PruningProblem, tmp_path: Any) -> None:
    from agents.sb3 import SB3Policy

    result = search("ppo", problem, 4, seed=0, budget_range=(0.3, 0.7))
    result.policy.save(tmp_path / "policy")
    again = SB3Policy.load(tmp_path / "policy")
    assert (again.algo, again.env, again.budget_range) == ("ppo", "oneshot", (0.3, 0.7))
    for target in (0.3, 0.45, 0.7):
        np.testing.assert_array_equal(
            again.keep_for(problem, target), result.policy.keep_for(problem, target)
        )
    # Tighter targets keep fewer MACs: the policy is applied at the target asked for.
    costs = [problem.projector.cost_ratio(again.keep_for(problem, t)) for t in (0.3, 0.5, 0.7)]
    assert costs[0] <= 0.3 + 1e-9 and costs[0] < costs[2]
    with pytest.raises(prune_env.InvalidSettingError, match="no saved policy"):
        SB3Policy.load(tmp_path)
    from agents.policies import load_policy

    assert isinstance(load_policy(tmp_path / "policy"), SB3Policy)


@pytest.mark.parametrize("name", [a for a in SMALL_BUDGETS if a not in SB3 and a != "predictor"])
def test_agents_of_one_target_carry_their_best_allocation_over_the_range(
    problem: PruningProblem, name: str, tmp_path: Any
) -> None:
    """budget_range for an agent that searches one target: it searches the problem's target (inside the
    range) and its policy is its best allocation, projected onto any target in the range with no evaluation;
    saved and loaded, it decides the same. A problem target outside the range is refused first."""
    from agents.policies import AllocationPolicy, load_policy

    result = search(name, problem, 4, seed=0, budget_range=(0.3, 0.7))
    assert all(e.target == pytest.approx(0.5) for e in result.history)
    policy = result.policy
    assert isinstance(policy, AllocationPolicy) and policy.budget_range == (0.3, 0.7)
    if name != "rlpruner":  # RL-Pruner's policy is its learned distribution (see the test below)
        np.testing.assert_array_equal(policy.keep_for(problem), result.best_keep)
    before = problem.evaluations
    again = load_policy(policy.save(tmp_path / "policy"))
    costs = []
    for target in (0.3, 0.45, 0.7):
        keep = again.keep_for(problem, target)
        np.testing.assert_array_equal(keep, policy.keep_for(problem, target))
        costs.append(problem.projector.cost_ratio(keep))
        assert costs[-1] <= target * (1 + 1e-9) and np.all((keep >= 1) & (keep <= problem.units))
    assert costs[0] < costs[-1]
    assert problem.evaluations == before  # applying a policy costs no evaluation
    with pytest.raises(prune_env.InvalidSettingError, match=r"outside the budget range 0\.3 to 0\.7"):
        again.keep_for(problem, 0.001)
    with pytest.raises(prune_env.InvalidSettingError, match=r"searches one target, 0.5.*ddpg, ppo"):
        search(name, problem, 4, budget_range=(0.6, 0.7))


def test_seernet_leaves_its_predictor_which_reoptimises_per_target(
    problem: PruningProblem, tmp_path: Any
) -> None:
    """SeerNet's policy is its trained predictor: at each target, gradient ascent on the predicted accuracy
    under that target's barrier (no evaluation); saved and loaded, it decides the same."""
    from agents.policies import load_policy
    from agents.predictor import PredictorPolicy

    result = search("predictor", problem, 8, seed=0, budget_range=(0.3, 0.7))
    policy = result.policy
    assert isinstance(policy, PredictorPolicy) and policy.budget_range == (0.3, 0.7)
    before = problem.evaluations
    again = load_policy(policy.save(tmp_path / "policy"))
    assert isinstance(again, PredictorPolicy)
    keeps = {}
    for target in (0.3, 0.45, 0.7):
        keeps[target] = again.keep_for(problem, target)
        np.testing.assert_array_equal(keeps[target], policy.keep_for(problem, target))
        cost = problem.projector.cost_ratio(keeps[target])
        assert target - 0.05 <= cost <= target * (1 + 1e-9)  # the ascent spends the budget it is given
        assert np.all((keeps[target] >= 1) & (keeps[target] <= problem.units))
    assert problem.evaluations == before
    # Not the best allocation carried over: the ascent moves away from it at every target.
    for target, keep in keeps.items():
        assert not np.array_equal(keep, problem.keep_for(np.array(policy.start_ratios), target))
    with pytest.raises(prune_env.InvalidSettingError, match=r"outside the budget range 0\.3 to 0\.7"):
        again.keep_for(problem, 0.001)
    (tmp_path / "policy" / "predictor.pt").unlink()
    with pytest.raises(prune_env.InvalidSettingError, match="no saved policy"):
        load_policy(tmp_path / "policy")


def test_rlpruner_leaves_its_learned_distribution(problem: PruningProblem) -> None:
    """RL-Pruner's policy is its distribution's mean after the updates: from uniform, after each batch of
    four samples one step (lr 0.5) toward that batch's best-rewarded sample — not merely the best policy."""
    result = search("rlpruner", problem, 8, seed=0)
    mean = problem.ratios_for(problem.uniform_keep())
    for batch in (result.history[:4], result.history[4:]):
        top = max(batch, key=lambda e: e.reward)
        mean = mean + 0.5 * (np.asarray(top.ratios) - mean)
    np.testing.assert_allclose(result.policy.ratios, mean)
    assert not np.allclose(result.policy.ratios, result.best_ratios)


def test_budget_range_is_checked(problem: PruningProblem) -> None:
    with pytest.raises(prune_env.InvalidSettingError, match="budget_range"):
        search("ppo", problem, 4, budget_range=(0.7, 0.3))
    evaluator = BudgetedEvaluator(problem, 2)
    outcome = problem.evaluate(np.full(problem.n_groups, 0.3), target=0.4)
    with pytest.raises(prune_env.InvalidSettingError, match="cannot be counted"):
        evaluator.record(outcome)  # scored at another target than this evaluator's


def test_evolution_sizes_its_population_to_the_budget() -> None:
    from agents.evolution import EvolutionSettings

    assert EvolutionSettings().sizes(100) == (16, 6)  # several generations in a short search
    assert EvolutionSettings().sizes(1000) == (50, 10)  # MetaPruning's population and top-k
    assert EvolutionSettings().sizes(12) == (4, 6)  # never more than a third of the budget
    assert EvolutionSettings(population=8, top_k=3).sizes(1000) == (8, 3)
    with pytest.raises(prune_env.InvalidSettingError, match="population must be an integer >= 2"):
        EvolutionSettings(population=1)
