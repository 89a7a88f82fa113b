"""Ray, an optional dependency: whether settings ask for it, whether they can run, and clear errors where not.

Kept apart from :mod:`prune_env.distributed` (which imports torch) so that settings can be checked, and
``prune-env --help`` answered, without importing torch.

What can run is checked before Ray starts. On this machine, one worker per CPU core this process may use:
a worker scores (or steps) with its own torch thread, so more workers than cores only share the cores, and
each asks Ray for a CPU, so Ray would start a process for every one of them (a huge count exhausted the
memory). A cluster's address must answer within :data:`CONNECT_TIMEOUT_S` (Ray itself would wait minutes).
"""

from __future__ import annotations

import os
import socket
import time
from types import ModuleType

from prune_env.errors import InvalidSettingError
from prune_env.validation import ray_address, ray_host_port

# A cluster's head answers a connection in milliseconds, even across a data centre; past this it is down,
# firewalled or misnamed. Ray's own connection attempts give up only after minutes (GCS) or 30 s (Ray Client).
CONNECT_TIMEOUT_S = 10.0


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise InvalidSettingError(
            "parallel workers run on Ray, an optional dependency: pip install 'prune-env[ray]' (or pip install ray)"
        ) from None
    return ray


def local_cpus() -> int:
    """The CPU cores this process may run on (its affinity, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cluster_address(address: str | None) -> str | None:
    """The cluster Ray would join for ``address`` (checked): the address itself, or with none the
    ``RAY_ADDRESS`` environment variable as Ray reads it; None means a Ray started on this machine."""
    if address is not None:
        return address
    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    if not from_env:
        return None
    return ray_address("the RAY_ADDRESS environment variable", from_env)


def check_capacity(
    count: int,
    available: float,
    *,
    asked: str,
    where: str,
    per_worker: float = 1.0,
    unit: str = "CPU",
    hint: str = "",
) -> None:
    """Refuse ``count`` workers of ``per_worker`` ``unit`` each where ``available`` are: Ray would start
    them all (or leave the rest waiting for ever)."""
    if count * per_worker <= available:
        return
    fit = int(available // per_worker)
    each = f"{per_worker:g} {unit}s" if per_worker != 1 else "one"
    limit = f"at most {fit}" if fit else f"fewer {unit}s per worker"
    raise InvalidSettingError(
        f"{asked} is more than {where} can run: it has {available:g} {unit}s and each worker takes {each}; "
        f"ask for {limit}{hint}"
    )


def check_fits_here(
    workers: int, *, asked: str, per_worker: float = 1.0, cluster_option: str = "ray_address"
) -> None:
    """``workers`` on a Ray started on this machine: one per CPU core this process may use."""
    check_capacity(
        workers,
        local_cpus(),
        asked=asked,
        where="this machine",
        per_worker=per_worker,
        unit="CPU core",
        hint=f", or join a cluster with {cluster_option}",
    )


def check_answers(address: str) -> None:
    """Refuse, within :data:`CONNECT_TIMEOUT_S`, a cluster address nothing answers at (``"auto"``: no
    cluster found on this machine), before Ray is asked to connect."""
    host_port = ray_host_port(address)
    named = address
    if host_port is None:  # "auto": the cluster Ray would find on this machine
        from ray._private import services

        try:
            found = services.canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise InvalidSettingError(
                'Ray address "auto": no Ray cluster is running on this machine; start one (ray start --head) '
                "or leave the address unset to run Ray here"
            ) from None
        host_port = ray_host_port(found)
        if host_port is None:
            return
        named = f'"auto" (the cluster last started on this machine, at {found})'
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    try:
        socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S).close()
    except TimeoutError:
        problem = "no reply"
    except socket.gaierror:
        problem = f"host {host_port[0]} not found"
    except OSError as exc:
        problem = (exc.strerror or str(exc)).lower()
    else:
        # Something listens; Ray (its head and its Ray Client server) speaks gRPC. Anything else would keep
        # Ray's own connection attempts waiting for minutes.
        import grpc

        host, port = host_port
        with grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
                return
            except grpc.FutureTimeoutError:
                problem = "something listens there, but not Ray"
    raise InvalidSettingError(
        f"Ray address {named} does not answer within {CONNECT_TIMEOUT_S:g} s ({problem}); start the cluster "
        "(ray start --head) or correct the address, or leave it unset to run Ray on this machine"
    )


def uses_ray(workers: int | None, address: str | None, *, option_style: bool = False) -> bool:
    """Whether settings (already checked) ask for Ray: several workers, or a cluster. If they do, before
    any work: Ray must be installed, a cluster's address must answer, and on this machine the workers must
    fit its cores. (A process already connected to Ray keeps its connection: the workers are checked
    against that cluster once the problem is there.)"""
    wanted = (workers is not None and workers > 1) or address is not None
    if not wanted:
        return False
    ray = import_ray()
    if ray.is_initialized():
        return True
    target = cluster_address(address)
    if target is not None:
        check_answers(target)
    elif workers is not None:
        if option_style:
            check_fits_here(workers, asked=f"--workers {workers}", cluster_option="--ray-address")
        else:
            check_fits_here(workers, asked=f"workers={workers}")
    return True


__all__ = [
    "CONNECT_TIMEOUT_S",
    "check_answers",
    "check_capacity",
    "check_fits_here",
    "cluster_address",
    "import_ray",
    "local_cpus",
    "uses_ray",
]
