"""The Gymnasium environments: API conformance, determinism, budget, rewards, errors, vectorisation."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quick import QUICK_SCORING
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch import nn

import prune_env  # registers the environment ids
from prune_env import InvalidSettingError, UnknownNameError
from prune_env.env import LayerPruneEnv, OneShotPruneEnv
from prune_env.problem import PruningProblem
from prune_env.rewards import Outcome, StepInfo

IDS = ["prune_env/LayerPrune-v0", "prune_env/OneShotPrune-v0"]


@pytest.fixture(scope="module")
def base(untrained_resnet20: nn.Module) -> nn.Module:
    # The environment's mechanics (checkers, determinism, budgets, rewards) do not need a trained model.
    return untrained_resnet20


@pytest.fixture(scope="module")
def problem(base: nn.Module, digits: Any) -> PruningProblem:
    return PruningProblem(base, digits, target_macs=0.5, **QUICK_SCORING)


def rollout(env: gym.Env, actions: list[np.ndarray], seed: int) -> list[tuple]:
    obs, info = env.reset(seed=seed)
    trace: list[tuple] = [(obs.copy(), info)]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        trace.append((obs.copy(), reward, terminated, truncated, info))
        if terminated or truncated:
            obs, info = env.reset()
    return trace


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("env_id", IDS)
def test_gymnasium_and_sb3_checkers_are_silent(env_id: str, base: nn.Module, digits: Any) -> None:
    env = gym.make(env_id, model=base, dataset=digits, **QUICK_SCORING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=False)
        sb3_check_env(env.unwrapped, warn=True)
    assert [str(w.message) for w in caught] == []
    assert env.spec is not None and env.spec.id == env_id


@pytest.mark.parametrize("cls", [LayerPruneEnv, OneShotPruneEnv])
def test_same_seed_same_actions_same_everything(cls: type, problem: PruningProblem) -> None:
    rng = np.random.default_rng(0)
    shape = (1,) if cls is LayerPruneEnv else (problem.n_groups,)
    actions = [rng.uniform(-1.2, 1.2, shape).astype(np.float32) for _ in range(2 * problem.n_groups)]
    kwargs = {"budget_range": (0.3, 0.7)}
    # Separate problems: nothing shared between the two environments but the arguments.
    a = cls(problem.base_model, problem.splits, problem=None, **QUICK_SCORING, **kwargs)
    b = cls(problem.base_model, problem.splits, problem=None, **QUICK_SCORING, **kwargs)
    assert_same(rollout(a, actions, seed=7), rollout(b, actions, seed=7))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_budget_holds_for_any_actions(data: st.DataObject, problem: PruningProblem) -> None:
    """Random and extreme actions (beyond [-1, 1] too): the built model never exceeds the target."""
    target = data.draw(st.floats(0.2, 1.0))
    extreme = st.sampled_from([-1e6, -1.0, 1.0, 1e6])
    value = st.one_of(st.floats(-3, 3), extreme)
    ratios_action = np.array(data.draw(st.lists(value, min_size=problem.n_groups, max_size=problem.n_groups)))
    oneshot = OneShotPruneEnv(problem=problem)
    oneshot.reset(seed=0, options={"target": target})
    _, _, terminated, _, info = oneshot.step(ratios_action.astype(np.float32))
    assert terminated and info["macs_ratio"] <= target * (1 + 1e-9)
    model = problem.build(oneshot.kept)
    measured = prune_env.count_macs(model, problem.example_inputs)
    assert measured == info["macs"] <= target * problem.graph.base_macs

    layer = LayerPruneEnv(problem=problem)
    layer.reset(seed=0, options={"target": target})
    for a in ratios_action:
        _, _, terminated, _, info = layer.step(np.array([a], dtype=np.float32))
    assert terminated and info["macs_ratio"] <= target * (1 + 1e-9)
    measured = prune_env.count_macs(problem.build(layer.kept), problem.example_inputs)
    assert measured == info["macs"] <= target * problem.graph.base_macs  # the layer-wise env's model too


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fill_budget_spends_the_budget_without_exceeding_it(
    data: st.DataObject, problem: PruningProblem
) -> None:
    """fill=True: a policy under the target is scaled back to just under it (never over, never below the
    plain projection); one over the target is projected exactly as without fill."""
    projector = problem.projector
    target = data.draw(st.floats(0.2, 0.95), label="target")
    ratios = np.array(
        data.draw(st.lists(st.floats(0.0, 0.8), min_size=problem.n_groups, max_size=problem.n_groups))
    )
    plain = projector.project(ratios, target)
    filled = projector.project(ratios, target, fill=True)
    assert projector.cost_ratio(plain) <= projector.cost_ratio(filled) <= target
    if projector.cost_ratio(problem.unprojected_keep(ratios)) > target:
        np.testing.assert_array_equal(filled, plain)
        return
    # Under the budget: at least as close to the target as the best γ·ratios of a brute-force 1001-point scan.
    gammas = np.linspace(0.0, 1.0, 1001)
    scan = (
        problem.graph.costs.macs_batch(problem.unprojected_keep(gammas[:, None] * ratios))
        / projector.base_cost
    )
    assert projector.cost_ratio(filled) >= scan[scan <= target].max() - 1e-9


def test_a_policy_that_prunes_too_little_is_pushed_to_the_target(problem: PruningProblem) -> None:
    env = OneShotPruneEnv(problem=problem)
    env.reset(seed=0)
    _, _, _, _, info = env.step(-np.ones(problem.n_groups, dtype=np.float32))  # "prune nothing"
    assert 0.45 <= info["macs_ratio"] <= 0.5  # pushed all the way to (just under) the 0.5 target
    layer = LayerPruneEnv(problem=problem)
    layer.reset(seed=0)
    for _ in range(problem.n_groups):
        _, _, done, _, info = layer.step(np.array([-1.0], dtype=np.float32))
    assert done and 0.4 <= info["macs_ratio"] <= 0.5


def test_params_target(base: nn.Module, digits: Any) -> None:
    env = OneShotPruneEnv(base, digits, target_params=0.4, **QUICK_SCORING)
    env.reset(seed=0)
    _, _, _, _, info = env.step(-np.ones(env.problem.n_groups, dtype=np.float32))
    assert info["params_ratio"] <= 0.4 and info["target"] == 0.4
    assert prune_env.count_params(env.problem.build(env.kept)) == info["params"]


def test_custom_reward_is_used_exactly(problem: PruningProblem) -> None:
    seen: list[Outcome] = []

    def reward(outcome: Outcome) -> float:
        seen.append(outcome)
        return 123.0 + outcome.accuracy

    env = OneShotPruneEnv(problem=problem, reward=reward)
    env.reset(seed=0)
    _, r, _, _, info = env.step(np.zeros(problem.n_groups, dtype=np.float32))
    assert len(seen) == 1 and r == 123.0 + seen[0].accuracy == 123.0 + info["accuracy"]


def test_reward_shaping_is_opt_in(problem: PruningProblem) -> None:
    class Shaped:
        def __call__(self, outcome: Outcome) -> float:
            return outcome.accuracy

        def shape(self, step: StepInfo) -> float:
            return -step.ratio

    plain = LayerPruneEnv(problem=problem)
    shaped = LayerPruneEnv(problem=problem, reward=Shaped())
    for env, expect_zero in ((plain, True), (shaped, False)):
        env.reset(seed=0)
        _, r, _, _, info = env.step(np.array([0.5], dtype=np.float32))
        assert (r == 0.0) is expect_zero
        if not expect_zero:
            assert r == pytest.approx(-info["applied_ratio"])


@pytest.mark.parametrize("preset", ["acc", "acc_log_macs", "mnas", "hard", "lagrangian"])
def test_reward_presets(preset: str, problem: PruningProblem) -> None:
    env = OneShotPruneEnv(problem=problem, reward=preset)
    env.reset(seed=0)
    _, r, _, _, info = env.step(np.zeros(problem.n_groups, dtype=np.float32))
    assert isinstance(r, float) and np.isfinite(r)
    if preset == "acc":
        assert r == info["accuracy"]


def test_bad_actions_raise_value_error(problem: PruningProblem) -> None:
    env = OneShotPruneEnv(problem=problem)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.full(problem.n_groups, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(problem.n_groups + 1, dtype=np.float32))
    layer = LayerPruneEnv(problem=problem)
    layer.reset(seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        layer.step(np.array([np.inf], dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer.step(np.zeros(3, dtype=np.float32))


def test_wrong_kwargs_give_clear_errors(base: nn.Module, digits: Any, problem: PruningProblem) -> None:
    with pytest.raises(InvalidSettingError, match=r"no setting target_mac; its settings are: .*target_macs"):
        gym.make("prune_env/OneShotPrune-v0", model=base, dataset=digits, target_mac=0.5)
    with pytest.raises(ValueError, match="impossible"):
        OneShotPruneEnv(base, digits, target_macs=0.001, **QUICK_SCORING)
    with pytest.raises(ValueError, match="give one budget, not target_macs and target_params"):
        OneShotPruneEnv(base, digits, target_macs=0.5, target_params=0.5)
    with pytest.raises(UnknownNameError, match="unknown reward 'accuracy'"):
        OneShotPruneEnv(problem=problem, reward="accuracy")
    with pytest.raises(ValueError, match="budget_range"):
        OneShotPruneEnv(problem=problem, budget_range=(0.8, 0.2))
    with pytest.raises(UnknownNameError, match="unknown dataset"):
        OneShotPruneEnv(base, "mnist-please")
    with pytest.raises(ValueError, match="render_mode"):
        OneShotPruneEnv(problem=problem, render_mode="human")
    env = OneShotPruneEnv(problem=problem, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert isinstance(frame, np.ndarray) and frame.shape == (64, 6 * problem.n_groups, 3)


def test_budget_range_is_sampled_and_observed(problem: PruningProblem) -> None:
    env = OneShotPruneEnv(problem=problem, budget_range=(0.3, 0.7))
    targets = {round(env.reset(seed=s)[1]["target"], 6) for s in range(6)}
    assert len(targets) == 6 and all(0.3 <= t <= 0.7 for t in targets)
    obs, info = env.reset(seed=1)
    assert obs[-1] == np.float32(info["target"])


def test_layer_observation_reports_the_costs_of_the_decisions_so_far(problem: PruningProblem) -> None:
    """Every step's observation: the current group's static features, then MACs removed so far (later
    groups whole), MACs still removable (later groups down to their minimum), previous ratio, target —
    recomputed here from the cost model, independently of the environment's bookkeeping."""
    env = LayerPruneEnv(problem=problem)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(3)
    costs, base = problem.graph.costs, problem.graph.base_macs
    decided: list[int] = []
    previous = 0.0
    n_static = len(env._static[0])
    for t in range(problem.n_groups):
        later_whole = np.concatenate([decided, problem.units[t:]]).astype(np.int64)
        later_min = np.concatenate([decided, problem.projector.min_keep[t:]]).astype(np.int64)
        expected = [
            1 - costs.macs(later_whole) / base,
            (costs.macs(later_whole) - costs.macs(later_min)) / base,
            previous / problem.max_ratio,
            env.target,
        ]
        np.testing.assert_array_equal(obs[:n_static], env._static[t])
        np.testing.assert_array_equal(obs[n_static:], np.clip(expected, 0, 1).astype(np.float32))
        obs, _, terminated, _, info = env.step(rng.uniform(-1, 1, (1,)).astype(np.float32))
        previous = info["applied_ratio"]
        decided.append(int(env.kept[t]))
    assert terminated


def test_render_ansi(problem: PruningProblem) -> None:
    env = LayerPruneEnv(problem=problem, render_mode="ansi")
    env.reset(seed=0)
    for _ in range(problem.n_groups):
        env.step(np.array([0.0], dtype=np.float32))
    text = env.render()
    assert text is not None and problem.group_names[0] in text and "proxy accuracy" in text


def test_user_model_is_never_mutated(base: nn.Module, digits: Any) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    env = OneShotPruneEnv(base, digits, finetune_steps=2, **QUICK_SCORING)
    env.reset(seed=0)
    env.step(np.zeros(env.problem.n_groups, dtype=np.float32))
    assert env.problem.base_model is not base
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_subprocess_vector_env_and_ppo(base: nn.Module, digits: Any) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = make_vec_env(
        "prune_env/OneShotPrune-v0",
        n_envs=2,
        seed=0,
        vec_env_cls=SubprocVecEnv,
        env_kwargs={"model": base, "dataset": digits, **QUICK_SCORING},
        monitor_kwargs={"info_keywords": ("accuracy", "macs_ratio")},
    )
    try:
        model = PPO("MlpPolicy", vec, n_steps=32, batch_size=32, n_epochs=2, seed=0, device="cpu")
        model.set_logger(Logger(folder=None, output_formats=[]))  # no stray /tmp/SB3-<date> directory
        model.learn(total_timesteps=128)  # two rollouts of 2 x 32 one-step episodes
        assert model.num_timesteps >= 128
        assert model._n_updates > 0  # PPO optimised its policy, not only collected data
        episodes = list(model.ep_info_buffer)  # SB3 keeps the last 100 episodes
        assert len(episodes) == 100
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in episodes)
        assert all(e["macs_ratio"] <= 0.5 + 1e-9 for e in episodes)
    finally:
        vec.close()


def test_scoring_a_handed_over_model_equals_scoring_a_copy(problem: PruningProblem) -> None:
    """The environment lets the proxy modify the pruned model it built (no copy); scores must not change."""
    keep = problem.keep_for(np.full(problem.n_groups, 0.3))
    model = problem.build(keep)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = problem.proxy.evaluate(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # evaluate copies
    owned = problem.proxy.evaluate_owned(problem.build(keep))
    assert (owned.accuracy, owned.loss) == (copied.accuracy, copied.loss)


def test_reused_module_tree_scores_like_fresh_models(base: nn.Module, digits: Any) -> None:
    """The hot path rebuilds every candidate into one module tree; with KD steps mutating each candidate,
    a sequence of evaluations must score exactly as fresh deep-copied models do, and revisits agree."""
    problem = PruningProblem(base, digits, target_macs=0.5, finetune_steps=2, **QUICK_SCORING)
    assert problem.proxy.keeps_models is False
    rng = np.random.default_rng(0)
    keeps = [problem.keep_for(rng.uniform(0, 0.8, problem.n_groups)) for _ in range(3)]
    keeps.append(keeps[0])
    first = problem.build_for_evaluation(keeps[0])
    assert problem.build_for_evaluation(keeps[1]) is first  # one reused tree...
    for keep in keeps:
        rebuilt = problem.proxy.evaluate_owned(problem.build_for_evaluation(keep))
        fresh = problem.proxy.evaluate_owned(problem.build(keep))  # ...scored like a fresh deep copy
        assert (rebuilt.accuracy, rebuilt.loss) == (fresh.accuracy, fresh.loss)
    assert problem.build(keeps[0]) is not problem.build(keeps[0])  # build() still gives standalone models


def test_a_proxy_that_keeps_models_gets_fresh_ones(base: nn.Module, digits: Any) -> None:
    """A custom proxy that may hold on to what it scores is never handed a reused module tree."""

    class Hoarder(prune_env.proxy.Proxy):
        def __init__(self) -> None:
            self.seen: list[nn.Module] = []

        def evaluate(self, model: nn.Module) -> prune_env.proxy.ProxyResult:
            self.seen.append(model)
            return prune_env.proxy.ProxyResult(accuracy=0.5, loss=1.0)

    proxy = Hoarder()
    # Without filling the budget, two uniform policies stay two different pruned models.
    problem = PruningProblem(base, digits, target_macs=0.5, proxy=proxy, fill_budget=False)
    problem.evaluate(np.full(problem.n_groups, 0.2))
    problem.evaluate(np.full(problem.n_groups, 0.6))
    assert len({id(m) for m in proxy.seen}) == len(proxy.seen) == 3  # the base model + two fresh builds


FRESH_INTERPRETER_VECTOR_ENVS = """
import sys

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

if __name__ == "__main__":
    kwargs = {"progress": False, "eval_samples": 60, "bn_recalib_batches": 1}
    vec = make_vec_env("prune_env:prune_env/OneShotPrune-v0", n_envs=2, vec_env_cls=SubprocVecEnv,
                       env_kwargs=kwargs)
    vec.reset()
    _, rewards, dones, infos = vec.step(np.stack([vec.action_space.sample() for _ in range(2)]))
    vec.close()
    assert dones.all() and all(i["macs_ratio"] <= 0.5 + 1e-9 for i in infos)
    assert "prune_env" not in sys.modules, "the workers imported prune_env, this process never did"
    for env_id in ("prune_env:prune_env/OneShotPrune-v0", "prune_env:prune_env/LayerPrune-v0"):
        for mode, options in (("sync", {}), ("async", {"context": "forkserver"})):
            envs = gym.make_vec(env_id, num_envs=2, vectorization_mode=mode, vector_kwargs=options, **kwargs)
            obs, _ = envs.reset(seed=0)
            assert obs.shape[0] == 2 and envs.observation_space.contains(obs)
            envs.step(envs.action_space.sample())
            envs.close()
    print("ok")
"""


def test_vector_envs_in_a_fresh_interpreter(tmp_path: Path, cached: Path) -> None:
    """``"prune_env:ID"`` makes the environments in any process — SB3's SubprocVecEnv workers and
    Gymnasium's vector API — from an interpreter that never imports prune_env itself (Gymnasium 1.x has no
    plugin entry point: the module prefix is how an unimported package's ids are found). The workers load
    the session's cached base model (``cached`` points PRUNE_ENV_CACHE at it)."""
    script = tmp_path / "vector_envs.py"
    script.write_text(FRESH_INTERPRETER_VECTOR_ENVS)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
