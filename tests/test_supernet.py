"""The trained proxies: Stage-wise Pruning's supernet and MetaPruning's PruningNet."""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prune_env import PruningProblem, count_macs
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError
from prune_env.settings import ProblemSettings
from prune_env.supernet import (
    PruningNetProxy,
    SupernetConfig,
    SupernetProxy,
    TrainedProxy,
    find_boundaries,
)
from prune_env.surgery import prune_channels
from tests.test_proxy import ForbiddenDataset, _refers_to

PROXIES = [SupernetProxy, PruningNetProxy]


def _problem(
    base: nn.Module, splits: Splits, cls: type[TrainedProxy], cache: Path, steps: int = 0, **settings
) -> PruningProblem:
    factory = functools.partial(cls, config=SupernetConfig(steps=steps, batch_size=64), cache=cache)
    return PruningProblem(base, splits, proxy=factory, progress=False, **settings)


def _random_keeps(problem: PruningProblem, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [problem.keep_for(rng.uniform(0.0, 0.8, problem.n_groups)) for _ in range(n)]


@pytest.mark.parametrize("cls", PROXIES)
def test_full_subnetwork_is_the_base_model_before_training(
    digits: Splits, digits_base, tmp_path: Path, cls: type[TrainedProxy]
) -> None:
    base, _ = digits_base
    problem = _problem(base, digits, cls, tmp_path)
    proxy = problem.proxy
    assert isinstance(proxy, cls)
    x = digits.example_inputs(8) + torch.randn(
        8, *digits.input_shape, generator=torch.Generator().manual_seed(0)
    )
    expected = base(x)
    # As a standalone model...
    assert torch.equal(proxy.select(problem.units).eval()(x), expected)
    # ...and through the differentiable slices training uses.
    proxy.shared.select(problem.units).eval()
    sources = proxy.generated(problem.units)
    assert torch.equal(proxy.shared.forward(x, sources), expected)


@pytest.mark.parametrize("cls", PROXIES)
def test_subnetwork_is_the_pruned_model_with_exact_macs(
    digits: Splits, digits_base, tmp_path: Path, cls: type[TrainedProxy]
) -> None:
    base, _ = digits_base
    problem = _problem(base, digits, cls, tmp_path)
    x = torch.randn(4, *digits.input_shape, generator=torch.Generator().manual_seed(1))
    for keep in _random_keeps(problem, 4):
        sub = problem.proxy.select(keep).eval()
        pruned = prune_channels(base, problem.graph, problem.proxy.shared.kept_units(keep)).eval()
        assert repr(sub) == repr(pruned)  # the same architecture
        assert count_macs(sub, x[:1]) == problem.graph.costs.macs(keep)
        # Untrained, a sub-network's weights are the base model's: it computes what the pruned model does.
        torch.testing.assert_close(sub(x), pruned(x))
    # What the problem hands out is the standalone sub-network as scored (a copy, BN recalibrated).
    keep = _random_keeps(problem, 1, seed=5)[0]
    model = problem.scored_model(keep)
    assert model is not problem.proxy.select(keep)
    assert count_macs(model, x[:1]) == problem.graph.costs.macs(keep)


@pytest.mark.parametrize("cls", PROXIES)
def test_training_improves_small_subnetworks_and_scoring_is_deterministic(
    digits: Splits, digits_base, tmp_path: Path, cls: type[TrainedProxy]
) -> None:
    base, _ = digits_base
    untrained = _problem(base, digits, cls, tmp_path, steps=0)
    trained = _problem(base, digits, cls, tmp_path, steps=40)
    assert not trained.proxy.cached and trained.proxy.train_seconds > 0
    tiniest = trained.proxy.sampler.tiniest
    before = untrained.evaluate_keep(tiniest)
    after = trained.evaluate_keep(tiniest)
    assert after.accuracy > before.accuracy + 0.05, (before.accuracy, after.accuracy)
    # Deterministic: the same policy scores the same, in this problem and in one loaded from the cache.
    again = _problem(base, digits, cls, tmp_path, steps=40)
    assert again.proxy.cached
    for keep in [tiniest, *_random_keeps(trained, 2)]:
        first = trained.proxy.evaluate_policy(keep, lambda: None)
        second = trained.proxy.evaluate_policy(keep, lambda: None)
        third = again.proxy.evaluate_policy(keep, lambda: None)
        assert (first.accuracy, first.loss) == (second.accuracy, second.loss) == (third.accuracy, third.loss)


def _cache_path(base: nn.Module, splits: Splits, cache: Path, config: SupernetConfig, **settings) -> Path:
    factory = functools.partial(SupernetProxy, config=config, cache=cache)
    proxy = PruningProblem(base, splits, proxy=factory, progress=False, **settings).proxy
    assert isinstance(proxy, SupernetProxy)
    return proxy.cache_path


def test_cache_key_covers_everything_that_determines_the_weights(
    digits: Splits, digits_base, untrained_resnet20: nn.Module, tmp_path: Path
) -> None:
    base, _ = digits_base
    config = SupernetConfig(steps=1, batch_size=32)
    reference = _cache_path(base, digits, tmp_path, config)
    assert reference.exists()
    changed = [
        _cache_path(base, digits, tmp_path, replace(config, steps=2)),
        _cache_path(base, digits, tmp_path, replace(config, lr=0.02)),
        _cache_path(base, digits, tmp_path, replace(config, stages=("layer1",))),
        _cache_path(base, digits, tmp_path, config, seed=1),
        _cache_path(base, digits, tmp_path, config, max_ratio=0.7),
        _cache_path(base, digits, tmp_path, config, importance="l2"),
        _cache_path(untrained_resnet20, digits, tmp_path, config),
    ]
    assert len({reference, *changed}) == len(changed) + 1
    # Scoring settings do not change the trained weights: the same entry serves them.
    assert _cache_path(base, digits, tmp_path, config, eval_samples=200) == reference


def test_a_damaged_cache_entry_is_retrained_not_used(digits: Splits, digits_base, tmp_path: Path) -> None:
    base, _ = digits_base
    first = _problem(base, digits, SupernetProxy, tmp_path, steps=2).proxy
    assert isinstance(first, SupernetProxy)
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="unusable cached checkpoint"):
        second = _problem(base, digits, SupernetProxy, tmp_path, steps=2).proxy
    assert not second.cached
    third = _problem(base, digits, SupernetProxy, tmp_path, steps=2).proxy
    assert third.cached  # the retrained entry was written back whole


@pytest.mark.parametrize("cls", PROXIES)
def test_trained_proxies_never_read_the_test_split(
    digits: Splits, digits_base, tmp_path: Path, cls: type[TrainedProxy]
) -> None:
    base, _ = digits_base
    forbidden = ForbiddenDataset()
    splits = replace(digits, test=forbidden)
    problem = _problem(base, splits, cls, tmp_path, steps=3)
    problem.evaluate_keep(_random_keeps(problem, 1)[0])
    assert not _refers_to(problem.proxy, forbidden)


def test_stage_boundaries_found_on_the_graph_and_checked(digits: Splits, digits_base, tmp_path: Path) -> None:
    base, _ = digits_base
    problem = _problem(base, digits, SupernetProxy, tmp_path)
    # resnet20: one boundary at the end of each resolution but the last, whose stage runs to the logits.
    found = find_boundaries(base, problem.graph, digits.example_inputs(2))
    assert [b.module for b in found] == ["layer1", "layer2"]
    assert [problem.graph.slots[b.slot].size for b in found] == [16, 32]
    assert [b.module for b in find_boundaries(base, problem.graph, digits.example_inputs(2), ["layer2"])] == [
        "layer2"
    ]
    # A block whose input the shortcut carries past it is not a cut of the data flow.
    with pytest.raises(InvalidSettingError, match="not usable"):
        find_boundaries(base, problem.graph, digits.example_inputs(2), ["layer1.0.conv1"])
    # Without stages the supernet still trains (logits only).
    flat = _problem(base, digits, SupernetProxy, tmp_path, steps=1)
    assert isinstance(flat.proxy, SupernetProxy) and len(flat.proxy.boundaries) == 2
    factory = functools.partial(SupernetProxy, config=SupernetConfig(steps=1, stages=()), cache=tmp_path)
    none = PruningProblem(base, digits, proxy=factory, progress=False).proxy
    assert isinstance(none, SupernetProxy) and none.boundaries == []


def test_stage_loss_is_zero_for_the_full_network_before_training(
    digits: Splits, digits_base, tmp_path: Path
) -> None:
    base, _ = digits_base
    problem = _problem(base, digits, SupernetProxy, tmp_path)
    proxy = problem.proxy
    assert isinstance(proxy, SupernetProxy)
    # Batch statistics differ from the running ones, so the full network is close to but not exactly
    # the teacher; a small sub-network is much further away.
    full = proxy.stage_loss(problem.units)
    tiny = proxy.stage_loss(proxy.sampler.tiniest)
    assert full < tiny / 5


def test_proxy_by_name_and_its_settings_are_checked(digits: Splits, digits_base, cached: Path) -> None:
    base, _ = digits_base
    problem = PruningProblem(base, digits, proxy="supernet", proxy_steps=2, progress=False)
    assert isinstance(problem.proxy, SupernetProxy) and problem.proxy.config.steps == 2
    assert problem.settings.proxy == "supernet"
    with pytest.raises(InvalidSettingError, match="proxy must be one of"):
        ProblemSettings(proxy="supernets")
    with pytest.raises(InvalidSettingError, match="proxy_steps"):
        ProblemSettings(proxy_steps=10)
    with pytest.raises(InvalidSettingError, match="steps must be an integer >= 0"):
        SupernetConfig(steps=-1)
    with pytest.raises(InvalidSettingError, match="macs_band"):
        SupernetConfig(macs_band=(0.5, 0.2))


def test_macs_band_sampling_draws_policies_in_the_band(digits: Splits, digits_base, tmp_path: Path) -> None:
    base, _ = digits_base
    factory = functools.partial(
        SupernetProxy, config=SupernetConfig(steps=0, macs_band=(0.2, 0.3)), cache=tmp_path
    )
    problem = PruningProblem(base, digits, proxy=factory, progress=False)
    sampler = problem.proxy.sampler  # type: ignore[attr-defined]
    fractions = [problem.graph.costs.macs(sampler.random()) / problem.graph.base_macs for _ in range(20)]
    assert all(0.17 <= f <= 0.3 for f in fractions), fractions
    assert np.std(fractions) > 0.01


def test_distillation_by_name_uses_the_measured_default_steps(digits: Splits, digits_base) -> None:
    base, _ = digits_base
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problem = PruningProblem(base, digits, proxy="distillation", progress=False, eval_samples=50)
    assert problem.proxy.finetune_steps == 50  # type: ignore[attr-defined]


@pytest.mark.parametrize("env_id", ["prune_env/LayerPrune-v0", "prune_env/OneShotPrune-v0"])
def test_both_environments_run_with_the_supernet_proxy(
    digits: Splits, digits_base, cached: Path, env_id: str
) -> None:
    import gymnasium as gym

    base, _ = digits_base
    env = gym.make(env_id, model=base, dataset=digits, proxy="supernet", proxy_steps=2, eval_samples=100)
    try:
        problem = env.unwrapped.problem
        assert isinstance(problem.proxy, SupernetProxy)
        env.reset(seed=0)
        terminated = False
        while not terminated:
            _, _, terminated, _, info = env.step(env.action_space.sample())
        assert 0.0 <= info["accuracy"] <= 1.0 and info["macs_ratio"] <= 0.5 + 1e-9
        assert problem.evaluations == 1
    finally:
        env.close()


def test_subprocess_vector_env_with_the_supernet_proxy(digits: Splits, digits_base, cached: Path) -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    base, _ = digits_base
    # Trained (and cached) here, so the workers load it rather than each training a copy.
    PruningProblem(base, digits, proxy="supernet", proxy_steps=2, eval_samples=100, progress=False)
    vec = make_vec_env(
        "prune_env/OneShotPrune-v0",
        n_envs=2,
        seed=0,
        vec_env_cls=SubprocVecEnv,
        env_kwargs={
            "model": base,
            "dataset": digits,
            "proxy": "supernet",
            "proxy_steps": 2,
            "eval_samples": 100,
            "progress": False,
        },
    )
    try:
        vec.reset()
        actions = np.stack([vec.action_space.sample() for _ in range(2)])
        _, rewards, dones, infos = vec.step(actions)
        assert dones.all() and all(0.0 <= i["accuracy"] <= 1.0 for i in infos)
        assert np.isfinite(rewards).all()
    finally:
        vec.close()


def test_search_and_benchmark_take_the_supernet_by_name(
    digits: Splits, digits_base, cached: Path, tmp_path: Path
) -> None:
    import agents
    from prune_env.app import benchmark

    base, _ = digits_base
    problem = PruningProblem(base, digits, proxy="supernet", proxy_steps=2, eval_samples=96, progress=False)
    result = agents.search("random", problem, budget_evals=4, seed=0)
    assert len(result.history) == 4 and problem.evaluations == 4
    results = benchmark.run(
        agents=("uniform",),
        seeds=(0,),
        evals=2,
        out=tmp_path / "grid",
        problem_kwargs={"proxy": "supernet", "proxy_steps": 2, "eval_samples": 96},
        progress=False,
    )
    assert len(results.runs) == 1


def test_distillation_steps_default_per_proxy_and_an_explicit_value_wins(
    digits: Splits, digits_base, cached: Path
) -> None:
    from prune_env.settings import DEFAULT_SUPERNET_FINETUNE_STEPS

    base, _ = digits_base
    quick = {"proxy_steps": 1, "eval_samples": 50, "progress": False}
    recalibration = PruningProblem(base, digits, eval_samples=50, progress=False).proxy
    supernet = PruningProblem(base, digits, proxy="supernet", **quick).proxy
    explicit = PruningProblem(base, digits, proxy="supernet", finetune_steps=0, **quick).proxy
    assert recalibration.finetune_steps == 0  # type: ignore[attr-defined]
    assert supernet.scorer.finetune_steps == DEFAULT_SUPERNET_FINETUNE_STEPS  # type: ignore[attr-defined]
    assert explicit.scorer.finetune_steps == 0  # type: ignore[attr-defined]


def test_a_training_forward_never_updates_the_shared_buffers(
    digits: Splits, digits_base, tmp_path: Path
) -> None:
    base, _ = digits_base
    proxy = _problem(base, digits, SupernetProxy, tmp_path).proxy
    assert isinstance(proxy, SupernetProxy)
    shared = proxy.shared
    before = {k: v.clone() for k, v in shared.weights.named_buffers()}
    x = torch.randn(8, *digits.input_shape, generator=torch.Generator().manual_seed(2))
    for keep in (proxy.sampler.units, proxy.sampler.tiniest):  # unsliced and sliced statistics
        shared.select(keep).train()
        shared.forward(x).sum().backward()
    after = dict(shared.weights.named_buffers())
    assert all(torch.equal(before[k], after[k]) for k in before)
