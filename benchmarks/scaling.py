"""Evaluations per second with policies scored on 1, 2, ... Ray workers, against the serial evaluator.

    python benchmarks/scaling.py --model resnet20 --dataset digits --evals 48 --workers 1 2 --repeats 3

The same random policies (projected onto the budget) are scored by the problem's proxy in this process
(one torch thread, as each worker has, and all threads) and by a :class:`prune_env.distributed.RayScorer`
with each number of workers; every figure is the median over ``--repeats`` and the ratio is to the
one-thread serial rate measured in the same run. Workers are started and warmed up before timing (their
one-off start, which sends the problem once, is printed apart). Ray's own cost per evaluation — kept counts
out, results back, scheduling — is measured separately with a proxy that does no work.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from prune_env.app.measure import time_repeats
from prune_env.distributed import RayScorer
from prune_env.optional_ray import import_ray
from prune_env.problem import PruningProblem
from prune_env.proxy import Proxy, ProxyResult


class NoWork(Proxy):
    """Scores nothing: what remains of a worker's evaluation is Ray's own cost."""

    keeps_models = False

    def evaluate(self, model: nn.Module) -> ProxyResult:
        return ProxyResult(accuracy=0.0, loss=0.0)

    def evaluate_policy(self, keep: np.ndarray, build: Callable[[], nn.Module]) -> ProxyResult:
        return ProxyResult(accuracy=0.0, loss=0.0)


def serial_seconds(
    problem: PruningProblem, keeps: list[tuple[int, ...]], threads: int, repeats: int
) -> float:
    fresh = problem

    def renew() -> None:
        nonlocal fresh
        fresh = copy.deepcopy(problem)  # a fresh copy each time: the memo would make repeats free

    def score() -> None:
        for keep in keeps:
            fresh.proxy_result(np.array(keep))

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return time_repeats(score, repeats, before_each=renew).median
    finally:
        torch.set_num_threads(old)


def ray_seconds(
    problem: PruningProblem, keeps: list[tuple[int, ...]], workers: int, repeats: int
) -> tuple[float, float]:
    """(median seconds to score ``keeps``, seconds to start and warm up the workers)."""
    times = []
    start = time.perf_counter()
    for repeat in range(repeats):
        with RayScorer(problem, workers) as scorer:  # fresh workers: nothing remembered between repeats
            scorer.score([keeps[0]] * workers)  # started, holding the problem
            if repeat == 0:
                startup = time.perf_counter() - start
            t0 = time.perf_counter()
            scorer.score(keeps)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), startup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints its tables to standard output and writes no file; committed runs are under benchmarks/results/, each with its command in that directory's README.md.",
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--proxy", default="recalibration")
    parser.add_argument("--evals", type=int, default=48)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ray = import_ray()
    ray.init(
        address="local",  # this machine's cores are what is measured, never a cluster found in /tmp/ray
        num_cpus=max(max(args.workers), os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="error",
    )
    problem = PruningProblem(
        args.model, args.dataset, target_macs=args.target, proxy=args.proxy, progress=False
    )
    rng = np.random.default_rng(args.seed)
    keeps = list(
        dict.fromkeys(
            tuple(problem.keep_for(rng.uniform(0.0, problem.max_ratio, problem.n_groups)).tolist())
            for _ in range(args.evals)
        )
    )
    print(
        f"{args.model} on {args.dataset}, proxy {args.proxy}, {len(keeps)} policies, {os.cpu_count()} CPUs, "
        f"median of {args.repeats}; load {os.getloadavg()[0]:.2f}"
    )
    base = serial_seconds(problem, keeps, 1, args.repeats)
    all_threads = serial_seconds(problem, keeps, torch.get_num_threads(), args.repeats)
    print(f"{'scoring':<28} {'evals/s':>8} {'ratio':>6} {'start s':>8}")
    print(f"{'serial, 1 thread':<28} {len(keeps) / base:8.2f} {1.0:6.2f}")
    print(
        f"{f'serial, {torch.get_num_threads()} threads':<28} {len(keeps) / all_threads:8.2f} {base / all_threads:6.2f}"
    )
    for workers in args.workers:
        seconds, startup = ray_seconds(problem, keeps, workers, args.repeats)
        print(
            f"{f'Ray, {workers} worker(s)':<28} {len(keeps) / seconds:8.2f} {base / seconds:6.2f} {startup:8.1f}"
        )

    idle = PruningProblem(problem.base_model, problem.splits, proxy=NoWork(), target_macs=args.target)
    idle_keeps = [keeps[k % len(keeps)] for k in range(400)]  # repeats are fine: no work to remember
    seconds, _ = ray_seconds(idle, idle_keeps, 1, args.repeats)
    print(
        f"Ray's own cost per evaluation (a proxy doing no work, 1 worker): {1000 * seconds / len(idle_keeps):.2f} ms "
        f"= {seconds / len(idle_keeps) / (base / len(keeps)):.1%} of a serial evaluation; load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
