"""Ray: policies scored on worker actors give the serial search exactly, survive a killed worker, and
run SB3 on environments living in actors. A local Ray with 2 CPUs is started here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'prune-env[ray]'); CI installs it")

from agents import BudgetedEvaluator, run_agent, search  # noqa: E402
from prune_env.distributed import RayScorer  # noqa: E402
from prune_env.problem import PruningProblem  # noqa: E402
from prune_env.proxy import Proxy, ProxyResult  # noqa: E402

FAST = {"eval_samples": 96, "bn_recalib_batches": 1}


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Any:
    # Classes defined in this file reach the actors by value: the workers cannot import the tests.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def problem(untrained_resnet20: nn.Module, digits: Any) -> PruningProblem:
    return PruningProblem(untrained_resnet20, digits, target_macs=0.5, **FAST)


def history(result: Any) -> list[tuple]:
    return [(e.index, e.keep, e.accuracy, e.loss, e.reward, e.macs_ratio) for e in result.history]


def one_thread() -> Any:
    """The serial reference scores with one torch thread, as each actor does (the same kernels)."""

    class Threads:
        def __enter__(self) -> None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc: object) -> None:
            torch.set_num_threads(self.old)

    return Threads()


@pytest.mark.parametrize(("agent", "budget"), [("random", 11), ("evolution", 40), ("rlpruner", 12)])
def test_ray_workers_give_the_serial_search(problem: PruningProblem, agent: str, budget: int) -> None:
    with one_thread():
        serial = search(agent, problem, budget, seed=3)
    fresh = PruningProblem(problem.base_model, problem.splits, problem.settings)  # no memo shared
    parallel = search(agent, fresh, budget, seed=3, workers=2)
    assert len(parallel.history) == len(serial.history) <= budget
    assert history(parallel) == history(serial)
    assert parallel.best_keep.tolist() == serial.best_keep.tolist()
    # scored by the workers, counted here: one proxy evaluation per distinct policy
    assert fresh.evaluations == len({e.keep for e in parallel.history})


class DiesOnce(Proxy):
    """Scores like ``inner``, but the process scoring ``victim`` first exits abruptly (a killed worker)."""

    keeps_models = False

    def __init__(self, inner: Proxy, victim: tuple[int, ...], marker: Path) -> None:
        self.inner, self.victim, self.marker = inner, victim, marker

    def evaluate(self, model: nn.Module) -> ProxyResult:
        return self.inner.evaluate(model)

    def evaluate_policy(self, keep: np.ndarray, build: Any) -> ProxyResult:
        if tuple(int(k) for k in keep) == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return self.inner.evaluate_policy(keep, build)


def test_a_killed_worker_costs_a_retry_and_nothing_is_lost_or_counted_twice(
    problem: PruningProblem, tmp_path: Path
) -> None:
    with one_thread():
        serial = search("random", problem, 10, seed=5)
    victim = serial.history[4].keep  # scored mid-search, in the middle of a batch of 4
    dying = PruningProblem(
        problem.base_model,
        problem.splits,
        proxy=DiesOnce(problem.proxy, victim, tmp_path / "died"),
        target_macs=0.5,
    )
    with RayScorer(dying, workers=2) as scorer:
        evaluator = BudgetedEvaluator(dying, 10, scorer=scorer)
        parallel = run_agent("random", evaluator, seed=5)
    assert (tmp_path / "died").exists()  # a worker did die, mid-task
    assert history(parallel) == history(serial)
    assert evaluator.used == 10 and [e.index for e in parallel.history] == list(range(10))
    assert dying.evaluations == len({e.keep for e in parallel.history})


def test_workers_are_refused_without_sense(problem: PruningProblem) -> None:
    from prune_env import InvalidSettingError

    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidSettingError, match="workers"):
            search("random", problem, 4, workers=bad)
    with pytest.raises(InvalidSettingError, match="ray_address"):
        search("random", problem, 4, workers=2, ray_address="")


def test_sb3_trains_on_environments_in_ray_actors(untrained_resnet20: nn.Module, digits: Any) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    from agents.ray_vec_env import RayVecEnv

    kwargs = {"model": untrained_resnet20, "dataset": digits, "target_macs": 0.5, **FAST}
    venv = RayVecEnv.from_id("prune_env/OneShotPrune-v0", n_envs=2, env_kwargs=kwargs)
    local = make_vec_env("prune_env/OneShotPrune-v0", n_envs=2, env_kwargs=kwargs)
    try:
        # the same environments, stepped in actors: the same observations, rewards and episode ends
        venv.seed(7)
        local.seed(7)
        assert np.array_equal(venv.reset(), local.reset())
        rng = np.random.default_rng(0)
        for _ in range(3):
            actions = rng.uniform(-1, 1, (2, *venv.action_space.shape)).astype(np.float32)
            obs, rewards, dones, infos = venv.step(actions)
            obs_l, rewards_l, dones_l, infos_l = local.step(actions)
            assert np.array_equal(obs, obs_l) and np.array_equal(rewards, rewards_l)
            assert np.array_equal(dones, dones_l)
            assert [i["macs_ratio"] for i in infos] == [i["macs_ratio"] for i in infos_l]
            assert all("terminal_observation" in i for i in infos)  # one-step episodes
        assert venv.get_attr("target") == local.get_attr("target") == [0.5, 0.5]
        venv.set_attr("success_tolerance", 0.2, indices=1)
        assert venv.get_attr("success_tolerance") == [local.get_attr("success_tolerance")[0], 0.2]
        model = PPO("MlpPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.learn(total_timesteps=64)
        assert model.num_timesteps >= 64 and model._n_updates > 0
    finally:
        venv.close()
        local.close()


def test_a_benchmark_grid_runs_as_ray_tasks_and_resumes(tmp_path: Path, cached: Path) -> None:
    import csv

    from prune_env.app import benchmark

    grid = {"agents": ("uniform", "random"), "evals": 3, "problem_kwargs": FAST, "progress": False}
    serial = benchmark.run(**grid, seeds=(0, 1), out=tmp_path / "serial")
    benchmark.run(**grid, seeds=(0,), out=tmp_path / "ray", workers=2)
    resumed = benchmark.run(**grid, seeds=(0, 1), out=tmp_path / "ray", workers=2)

    def outcome(rows: list[dict[str, Any]]) -> list[tuple]:
        return [(r["agent"], r["seed"], r["keep"], r["best_reward"], r["evals_used"]) for r in rows]

    assert outcome(resumed.runs) == outcome(serial.runs)  # grid order, the serial grid's results
    with open(tmp_path / "ray" / "runs.csv") as f:
        on_disk = list(csv.DictReader(f))
    assert len(on_disk) == 4  # the seed-0 runs were not run again
    evaluations = [(e["agent"], e["seed"], e["index"], e["keep"]) for e in resumed.evaluations]
    assert evaluations == [(e["agent"], e["seed"], e["index"], e["keep"]) for e in serial.evaluations]
