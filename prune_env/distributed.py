"""Scoring policies on Ray: worker processes on this machine, other machines or GPUs (``pip install prune-env[ray]``).

:class:`RayScorer` is a :class:`~prune_env.scoring.PolicyScorer` whose workers are Ray actors, each holding
one copy of the problem (base model, graph, rankings, proxy or trained supernet), sent once through Ray's
object store; afterwards only kept counts go out and proxy results come back. One actor per GPU where the
cluster has GPUs, one CPU each otherwise.

Ray restarts an actor that dies (a killed process, a lost machine) and retries the scores it had been asked
for, so a lost worker costs at most those evaluations again. Nothing is counted twice: what a search has
spent is counted where the results arrive (:meth:`~prune_env.problem.PruningProblem.prefetch`), never in
the workers.

The workers asked for must fit what can run, checked before any actor exists: this machine's cores before
Ray starts here, a cluster's CPUs (and GPUs) once joined (see :mod:`prune_env.optional_ray`). A Ray this
package starts or joins is stopped when its user is done, on an error and on an interrupt; a connection the
process already had is the user's and is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prune_env.errors import InvalidSettingError
from prune_env.optional_ray import (
    check_answers,
    check_capacity,
    check_fits_here,
    cluster_address,
    import_ray,
    local_cpus,
)
from prune_env.problem import PruningProblem
from prune_env.proxy import ProxyResult
from prune_env.validation import check_settings


def start_ray(
    workers: int | None, address: str | None = None, *, asked: str = "", per_worker: float = 1.0
) -> bool:
    """Connect to the Ray cluster at ``address``, or start Ray on this machine with one CPU per core (nothing
    happens when this process is already connected).

    Before Ray starts: on this machine ``workers`` (``asked``: how the error names them) of ``per_worker``
    CPUs each must fit the cores; a cluster must answer within
    :data:`~prune_env.optional_ray.CONNECT_TIMEOUT_S`. Returns whether this call started or joined Ray: the
    caller then owns it and ends it with :func:`stop_ray` on every way out; a connection the process already
    had is the user's and stays.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    target = cluster_address(address)
    if target is None and workers is not None:
        check_fits_here(workers, asked=asked or f"workers={workers}", per_worker=per_worker)
    elif target is not None:
        check_answers(target)
    try:
        if target is None:
            # "local": a Ray of our own, never a cluster found on the machine (that is what "auto" asks for).
            ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, logging_level="warning")
        else:
            ray.init(address=target, logging_level="warning")
            check_workers_import(target)
    except ConnectionError as exc:  # it answered, but not as a Ray cluster does
        stop_ray(True)
        reason = " ".join(str(exc).split())
        raise InvalidSettingError(
            f"Ray address {target} answered but Ray could not join it ({reason}); check that it is a Ray "
            "cluster's address (HOST:PORT of its head, or ray://HOST:PORT of its Ray Client server)"
        ) from None
    except BaseException:  # whatever a failed or interrupted start left behind is stopped
        stop_ray(True)
        raise
    return True


# A worker starts in seconds; a cluster that runs no task in this time is too busy or broken to search on.
WORKER_START_TIMEOUT_S = 60.0


def check_workers_import(target: str, module: str = "prune_env") -> None:
    """The workers of the cluster this process just joined at ``target`` must import ``module`` at this
    package's version, or every actor would die in its creation task (a traceback per actor) or score with
    other code. Checked with one task that needs no CPU of its own."""
    ray = import_ray()
    from prune_env import __version__

    def version() -> str:  # nested: pickled by value, so unpickling it needs no import of this package
        import importlib

        return str(getattr(importlib.import_module(module), "__version__", "unknown"))

    try:
        theirs = ray.get(ray.remote(num_cpus=0)(version).remote(), timeout=WORKER_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise InvalidSettingError(
            f"the Ray cluster at {target} ran no task within {WORKER_START_TIMEOUT_S:g} s; check that its "
            "workers start (ray status on the head)"
        ) from None
    except ray.exceptions.RayError as exc:
        if "No module named" not in str(exc):
            raise
        raise InvalidSettingError(
            f"the workers of the Ray cluster at {target} cannot import {module}: install prune-env "
            f"{__version__} in the Python environment of every node (or start the cluster from this one)"
        ) from None
    if module == "prune_env" and theirs != __version__:
        raise InvalidSettingError(
            f"the workers of the Ray cluster at {target} run prune-env {theirs}, this process {__version__}: "
            "install the same version on every node"
        )


def stop_ray(owned: bool) -> None:
    """End the Ray this package started or joined (``owned``, from :func:`start_ray`): its processes stop,
    a cluster is left (not stopped)."""
    if owned:
        import_ray().shutdown()


def check_cluster_fits(
    count: int, *, asked: str, cpus_each: float, gpus_each: float = 0.0, hint: str = ""
) -> None:
    """``count`` workers must fit the Ray this process is connected to, before any is created: Ray would
    leave those that do not waiting for resources for ever."""
    resources = import_ray().cluster_resources()
    where = "the Ray cluster this process is connected to"
    check_capacity(
        count, float(resources.get("CPU", 0)), asked=asked, where=where, per_worker=cpus_each, hint=hint
    )
    if gpus_each:
        check_capacity(
            count, float(resources.get("GPU", 0)), asked=asked, where=where, per_worker=gpus_each, unit="GPU",
            hint=hint,
        )  # fmt: skip


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
        self._ray = ray
        self.actors: list[Any] = []
        asked = f"workers={workers}" if workers else "one worker"
        self._owns_ray = start_ray(workers or 1, address, asked=asked, per_worker=threads_per_worker)
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            count = workers or (
                gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
            )
            check_cluster_fits(
                count,
                asked=asked,  # unset: as many as fit, so only one too big a worker can fail
                cpus_each=threads_per_worker,
                gpus_each=1 if gpus else 0,
                hint=" (or fewer threads_per_worker)" if threads_per_worker > 1 else "",
            )
            from ray.util import ActorPool

            actor = ray.remote(ScoringWorker).options(
                num_cpus=threads_per_worker,
                num_gpus=1 if gpus else 0,
                max_restarts=-1,  # a dead actor is started again from the same copy of the problem ...
                max_task_retries=-1,  # ... and the scores it owed are asked again
            )
            shared = ray.put(problem)
            for _ in range(count):
                self.actors.append(actor.remote(shared, threads_per_worker))
            self._pool = ActorPool(self.actors)
        except BaseException:  # a refusal, an error or an interrupt: nothing of ours is left running
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self.actors)

    def score(self, keeps: Sequence[tuple[int, ...]]) -> list[ProxyResult]:
        # Kept counts out, results back, in order; a worker takes the next policy when it is free.
        return list(self._pool.map(lambda worker, keep: worker.score.remote(keep), list(keeps)))

    def close(self) -> None:
        """Release the actors, and stop Ray if this scorer started (or joined) it."""
        actors, self.actors = self.actors, []
        try:
            for actor in actors:
                self._ray.kill(actor)
        finally:
            owned, self._owns_ray = self._owns_ray, False
            stop_ray(owned)

    def __enter__(self) -> RayScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
