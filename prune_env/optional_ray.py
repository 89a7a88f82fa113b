"""Ray, an optional dependency: whether settings ask for it, whether they can run, and clear errors where not.

Kept apart from :mod:`prune_env.distributed` (which imports torch) so that settings can be checked, and
``prune-env --help`` answered, without importing torch.

What can run is checked before Ray starts. On this machine, one worker per CPU core this process may use:
a worker scores (or steps) with its own torch thread, so more workers than cores only share the cores, and
each asks Ray for a CPU, so Ray would start a process for every one of them (a huge count exhausted the
memory). A cluster's address must answer within :data:`CONNECT_TIMEOUT_S` (Ray itself would wait minutes).
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from types import ModuleType
from typing import Any

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
    """Refuse, within :data:`CONNECT_TIMEOUT_S`, a cluster address where Ray does not answer (``"auto"``: no
    cluster found on this machine), before Ray is asked to connect: nothing listens, something that is not
    gRPC listens, or a gRPC service without the Ray method the address form needs (a head's GCS for
    HOST:PORT, a Ray Client server for ray://HOST:PORT) — Ray's own attempts would wait minutes, or for ever."""
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
    timeout = CONNECT_TIMEOUT_S
    outcome: list[str | None] = []
    client = address.startswith("ray://")
    # In a daemon thread: name resolution has no timeout of its own, so only the join bounds the whole probe.
    probe = threading.Thread(
        target=lambda: outcome.append(_probe(host_port, client, time.monotonic() + timeout)),
        name="prune-env-ray-probe",
        daemon=True,
    )
    probe.start()
    probe.join(timeout + 0.5)  # the probe's own deadlines end it first, unless resolving the host hangs
    problem = outcome[0] if outcome else "no reply"
    if problem is None:
        return
    if problem.startswith("answers"):
        raise InvalidSettingError(f"Ray address {named} {problem}")
    raise InvalidSettingError(
        f"Ray address {named} does not answer within {timeout:g} s ({problem}); start the cluster "
        "(ray start --head) or correct the address, or leave it unset to run Ray on this machine"
    )


def _probe(host_port: tuple[str, int], client: bool, deadline: float) -> str | None:
    """None when Ray answers at ``host_port`` before ``deadline``, else what answered instead."""
    try:
        socket.create_connection(host_port, timeout=max(0.1, deadline - time.monotonic())).close()
    except TimeoutError:
        return "no reply"
    except socket.gaierror:
        return f"host {host_port[0]} not found"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    try:
        return _ray_rpc(host_port, client, deadline)
    except Exception:  # a probe that cannot run must not refuse a cluster: Ray then says what is wrong
        return None


def _channel(host: str, port: int) -> Any:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:  # the channel Ray itself makes: its TLS and token settings, so a secured cluster answers the probe
        from ray._private.grpc_utils import init_grpc_channel

        return init_grpc_channel(target)
    except ImportError:
        import grpc

        return grpc.insecure_channel(target)


def _ray_rpc(host_port: tuple[str, int], client: bool, deadline: float) -> str | None:
    """Ray (its head and its Ray Client server) speaks gRPC: the channel must come up, and the one cheap call
    Ray makes first (GetClusterId of the GCS, or Ray Client's ping) must be known there."""
    import grpc

    with _channel(*host_port) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            return "something listens there, but not Ray"
        found = _ray_call(channel, client, deadline)
        if found == "ray":
            return None
        if found == "silent":
            return "something listens there, but not Ray"
        host, port = host_port
        if _ray_call(channel, not client, deadline) == "ray":  # the other form of address would work
            if client:
                return (
                    "answers as a Ray head (GCS), not as a Ray Client server: give it without ray:// "
                    f"({host}:{port}), or the head's Ray Client port (ray://{host}:10001 by default)"
                )
            return (
                f"answers as a Ray Client server, not as a Ray head (GCS): give it as ray://{host}:{port}, or "
                f"the head's own address ({host}:6379 by default)"
            )
        return (
            "answers gRPC, but no Ray head or Ray Client server is there: check the port (a head listens on "
            "HOST:6379 by default, its Ray Client server on ray://HOST:10001)"
        )


def _ray_call(channel: Any, client: bool, deadline: float) -> str:
    """Whether the service at ``channel`` knows Ray's first call: "ray", "not ray" (the method is unknown
    there) or "silent" (no reply before ``deadline``)."""
    import grpc

    timeout = max(0.1, deadline - time.monotonic())
    try:
        # Ray's generated protobuf modules (no type stubs): the messages and stubs of the installed version.
        if client:
            messages = importlib.import_module("ray.core.generated.ray_client_pb2")
            stubs = importlib.import_module("ray.core.generated.ray_client_pb2_grpc")
            ping = messages.ClusterInfoRequest(type=messages.ClusterInfoType.PING)
            stubs.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout)
        else:
            messages = importlib.import_module("ray.core.generated.gcs_service_pb2")
            stubs = importlib.import_module("ray.core.generated.gcs_service_pb2_grpc")
            stubs.NodeInfoGcsServiceStub(channel).GetClusterId(
                messages.GetClusterIdRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "not ray"
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            return "silent"
        # Any other refusal (unauthenticated, a bad argument) comes from a service that knows the method.
    return "ray"


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
