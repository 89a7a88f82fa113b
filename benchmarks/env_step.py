"""Environment step cost: episode wall time, the share spent outside the proxy's forward passes, and
episodes/s with 1 and 2 subprocess environments.

    python benchmarks/env_step.py [--models resnet20 resnet56] [--episodes 20] [--eval-samples 256] \
        [--bn-recalib-batches 8] [--dataset digits]

The proxy's own forward passes (BN recalibration + validation scoring) are timed with hooks on the pruned
model's root module; everything else in an episode — action mapping,
budget projection, surgery, copies, bookkeeping — is the environment's overhead. Target: <= 5% at 256
evaluation samples. Base models are trained once and cached (first run takes a few minutes per model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import prune_env
from prune_env.env import LayerPruneEnv, OneShotPruneEnv
from prune_env.problem import PruningProblem
from prune_env.proxy import DEFAULT_BN_RECALIB_BATCHES


class ForwardTimer:
    """Accumulates wall time spent inside forward passes of models it is attached to."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: list[float] = []
        self._attached: dict[int, nn.Module] = {}

    def attach(self, model: nn.Module) -> nn.Module:
        """Time ``model``'s forward passes (once per module object: the hot path rebuilds into one)."""
        if id(model) not in self._attached:
            self._attached[id(model)] = model
            model.register_forward_pre_hook(lambda *_: self._start.append(time.perf_counter()))
            model.register_forward_hook(lambda *_: self._stop())
        return model

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._start.pop()


def episode_costs(env: gym.Env, timer: ForwardTimer, episodes: int, rng: np.random.Generator) -> list[tuple]:
    rows = []
    for _ in range(episodes):
        env.reset()
        before = timer.seconds
        start = time.perf_counter()
        done = False
        while not done:
            _, _, done, _, _ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        total = time.perf_counter() - start
        rows.append((total, timer.seconds - before))
    return rows


def one_thread_env(**kwargs: object) -> gym.Env:
    """The one-shot env in a worker process, on one torch thread (workers start with the default)."""
    torch.set_num_threads(1)
    return gym.make("prune_env/OneShotPrune-v0", **kwargs)


def vector_throughput(problem_kwargs: dict, n_envs: int, steps: int) -> float:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = make_vec_env(
        one_thread_env, n_envs=n_envs, seed=0, vec_env_cls=SubprocVecEnv, env_kwargs=problem_kwargs
    )
    try:
        vec.reset()
        vec.step(np.stack([vec.action_space.sample() for _ in range(n_envs)]))  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            vec.step(np.stack([vec.action_space.sample() for _ in range(n_envs)]))
        return steps * n_envs / (time.perf_counter() - start)
    finally:
        vec.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints its tables to standard output and writes no file; committed runs are under benchmarks/results/, each with its command in that directory's README.md.",
    )
    parser.add_argument("--models", nargs="*", default=["resnet20", "resnet56"])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--vector-steps", type=int, default=20)
    parser.add_argument(
        "--bn-recalib-batches", type=int, default=DEFAULT_BN_RECALIB_BATCHES, help="the proxy's (env default)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per environment process, as in the vectorised runs
    rng = np.random.default_rng(0)
    print(f"{'model':<10} {'env':<8} {'episode s':>10} {'forward s':>10} {'overhead':>9}")
    for name in args.models:
        kwargs = {"eval_samples": args.eval_samples, "bn_recalib_batches": args.bn_recalib_batches}
        problem = PruningProblem(name, args.dataset, progress=True, **kwargs)
        timer = ForwardTimer()
        build = problem.build_for_evaluation
        problem.build_for_evaluation = lambda keep, build=build, timer=timer: timer.attach(build(keep))
        for cls in (OneShotPruneEnv, LayerPruneEnv):
            env = cls(problem=problem)
            rows = episode_costs(env, timer, args.episodes, rng)
            totals = [t for t, _ in rows]
            shares = [(t - f) / t for t, f in rows]
            fwd = [f for _, f in rows]
            print(
                f"{name:<10} {cls.__name__.removesuffix('PruneEnv'):<8} {statistics.median(totals):>10.4f} "
                f"{statistics.median(fwd):>10.4f} {statistics.median(shares):>8.1%}"
            )
        for n_envs in (1, 2):
            eps = vector_throughput(
                {"model": name, "dataset": args.dataset, **kwargs}, n_envs, args.vector_steps
            )
            print(f"{name:<10} SubprocVecEnv x{n_envs}: {eps:.2f} episodes/s (one-shot)")
    print(
        f"\nprune_env {prune_env.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )


if __name__ == "__main__":
    main()
