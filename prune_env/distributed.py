"""Scoring policies on Ray: worker processes on this machine, other machines or GPUs (``pip install prune-env[ray]``).

:class:`RayScorer` is a :class:`~prune_env.scoring.PolicyScorer` whose workers are Ray actors, each holding
one copy of the problem (base model, graph, rankings, proxy or trained supernet), sent once through Ray's
object store; afterwards only kept counts go out and proxy results come back. One actor per GPU where the
cluster has GPUs, one CPU each otherwise.

Ray restarts an actor that dies (a killed process, a lost machine) and retries the scores it had been asked
for, so a lost worker costs at most those evaluations again. Nothing is counted twice: what a search has
spent is counted where the results arrive (:meth:`~prune_env.problem.PruningProblem.prefetch`), never in
the workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prune_env.errors import InvalidSettingError
from prune_env.optional_ray import import_ray
from prune_env.problem import PruningProblem
from prune_env.proxy import ProxyResult
from prune_env.validation import check_settings


def start_ray(workers: int, address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one with CPUs for ``workers`` actors
    (nothing happens when this process is already connected)."""
    ray = import_ray()
    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, logging_level="warning")
    else:
        ray.init(address=address, logging_level="warning")


class ScoringWorker:
    """A Ray actor's state: one copy of the problem, scoring kept counts with its proxy."""

    def __init__(self, problem: PruningProblem, threads: int) -> None:
        # Each actor has its CPUs to itself: more torch threads would only fight over them.
        torch.set_num_threads(threads)
        self.problem = problem

    def score(self, keep: tuple[int, ...]) -> ProxyResult:
        return self.problem.proxy_result(np.asarray(keep, dtype=np.int64))

    def pid(self) -> int:
        return os.getpid()


class RayScorer:
    """Scores policies of ``problem`` on ``workers`` Ray actors (see the module docstring).

    Args:
        problem: the problem whose policies are scored; each actor gets a copy, sent once.
        workers: how many actors (default: the CPUs, or the GPUs, of the cluster).
        address: a Ray cluster to join (``"auto"``, ``"ray://HOST:10001"``); None starts Ray on this machine
            unless this process already called ``ray.init``.
        threads_per_worker: torch threads (and Ray CPUs) each actor uses.

    Use as a context manager, or call :meth:`close`, to release the actors.
    """

    def __init__(
        self,
        problem: PruningProblem,
        workers: int | None = None,
        *,
        address: str | None = None,
        threads_per_worker: int = 1,
    ) -> None:
        check_settings({"workers": workers, "ray_address": address})
        check_settings({"workers": threads_per_worker})  # the same rule: an integer >= 1
        if not isinstance(problem, PruningProblem):
            raise InvalidSettingError(f"problem must be a PruningProblem, got {type(problem).__name__}")
        ray = import_ray()
        start_ray(workers or 1, address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or (gpus or max(1, int(resources.get("CPU", 1)) // threads_per_worker))
        from ray.util import ActorPool

        actor = ray.remote(ScoringWorker).options(
            num_cpus=threads_per_worker,
            num_gpus=1 if gpus else 0,
            max_restarts=-1,  # a dead actor is started again from the same copy of the problem ...
            max_task_retries=-1,  # ... and the scores it owed are asked again
        )
        shared = ray.put(problem)
        self._ray = ray
        self.actors: list[Any] = [actor.remote(shared, threads_per_worker) for _ in range(count)]
        self._pool = ActorPool(self.actors)

    @property
    def workers(self) -> int:
        return len(self.actors)

    def score(self, keeps: Sequence[tuple[int, ...]]) -> list[ProxyResult]:
        # Kept counts out, results back, in order; a worker takes the next policy when it is free.
        return list(self._pool.map(lambda worker, keep: worker.score.remote(keep), list(keeps)))

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
