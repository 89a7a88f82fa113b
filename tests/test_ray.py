"""Ray: policies scored on worker actors give the serial search exactly, survive a killed worker, and
run SB3 on environments living in actors; what cannot run is refused before Ray starts (more workers than
cores, an address that does not answer), and a Ray this package starts is stopped on every way out.

The tests of refusals and of stopping need a process without Ray and come first; the others share one local
Ray with 2 CPUs, started by the user's own ``ray.init`` as a user would (``local_ray``)."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_output import one_error_line
from quick import QUICK_SCORING
from torch import nn

ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'prune-env[ray]'); CI installs it")

from agents import BudgetedEvaluator, run_agent, search  # noqa: E402
from agents.ray_vec_env import RayVecEnv  # noqa: E402
from prune_env import optional_ray  # noqa: E402
from prune_env.app import benchmark, cli  # noqa: E402
from prune_env.distributed import RayScorer  # noqa: E402
from prune_env.errors import InvalidSettingError  # noqa: E402
from prune_env.optional_ray import CONNECT_TIMEOUT_S, local_cpus  # noqa: E402
from prune_env.problem import PruningProblem  # noqa: E402
from prune_env.proxy import Proxy, ProxyResult  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_for_this_module() -> Any:
    # Classes defined in this file reach the actors by value: the workers cannot import the tests.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture
def local_ray() -> None:
    """The user's own connection (kept across the tests that share it)."""
    if not ray.is_initialized():
        # "local": a new Ray, never the cluster a stale /tmp/ray/ray_current_cluster names (address None
        # would join that one, and refuse num_cpus).
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False
        )


@pytest.fixture
def without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process not connected to Ray, with no cluster named in its environment."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


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


def gone(pids: list[int], within: float = 60.0) -> bool:
    """Whether every process of ``pids`` has exited (a zombie awaiting its parent counts as exited).

    Ray's workers exit on their own once their raylet is gone; on a 2-core machine running other jobs one
    took over 20 s, so the bound is generous: a process left behind is still there long after it."""

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")

    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def pids_in(folder: Path) -> list[int]:
    return sorted({int(f.read_text()) for f in folder.glob("*.pid")})


def note_pid(folder: Path) -> None:
    # Renamed into place: a worker killed mid-write (Ray's shutdown) must not leave an empty file to read.
    partial = folder / f"{os.getpid()}.pid.partial"
    partial.write_text(str(os.getpid()))
    os.replace(partial, folder / f"{os.getpid()}.pid")


class Marked(Proxy):
    """Scores like ``inner``; in a Ray worker, notes the process's id in ``folder`` and, with ``fail``, raises
    (the problem scores its base model in this process)."""

    keeps_models = False

    def __init__(self, inner: Proxy, folder: Path, fail: bool = False) -> None:
        self.inner, self.folder, self.fail, self.driver = inner, folder, fail, os.getpid()

    def evaluate(self, model: nn.Module) -> ProxyResult:
        return self.inner.evaluate(model)

    def evaluate_policy(self, keep: np.ndarray, build: Any) -> ProxyResult:
        if os.getpid() != self.driver:
            note_pid(self.folder)
            if self.fail:
                raise RuntimeError("the proxy failed")
        return self.inner.evaluate_policy(keep, build)


def marked(problem: PruningProblem, folder: Path, fail: bool = False) -> PruningProblem:
    return PruningProblem(
        problem.base_model, problem.splits, proxy=Marked(problem.proxy, folder, fail), target_macs=0.5
    )


def grid(problem: PruningProblem, out: Path, **kwargs: Any) -> Any:
    """A one-run benchmark grid on ``problem``'s model and data."""
    options: dict[str, Any] = {
        "agents": ("random",),
        "models": {"net": problem.base_model},
        "datasets": {"digits": problem.splits},
        "evals": 2,
        "problem_kwargs": QUICK_SCORING,
        "progress": False,
        "out": out,
        **kwargs,
    }
    return benchmark.run(**options)


def make_env() -> Any:
    raise AssertionError("never built: refused before")


# Every public way to ask for Ray workers; each call refuses with an InvalidSettingError (the CLI's one
# error line is raised as one, so that every entry is checked the same way).
Entry = Callable[[PruningProblem, Path, pytest.CaptureFixture[str], dict[str, Any]], Any]


def via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], options: dict[str, Any]) -> None:
    args = ["search", "--model", "tiny", "--dataset", "digits", "--out", str(tmp_path / "run")]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    assert cli.main(args) == 2
    raise InvalidSettingError(one_error_line(capsys.readouterr().err))


def via_vec_env(options: dict[str, Any]) -> Any:
    count = options.get("workers", 2)
    return RayVecEnv.from_id("prune_env/OneShotPrune-v0", count, address=options.get("ray_address"))


ENTRIES: dict[str, Entry] = {
    "search": lambda p, tmp, capsys, o: search("random", p, 4, **o),
    "RayScorer": lambda p, tmp, capsys, o: RayScorer(p, o.get("workers"), address=o.get("ray_address")),
    "benchmark.run": lambda p, tmp, capsys, o: grid(p, tmp / "grid", **o),
    "RayVecEnv": lambda p, tmp, capsys, o: via_vec_env(o),
    "cli": lambda p, tmp, capsys, o: via_cli(tmp, capsys, o),
}


def refused(
    entry: str, problem: PruningProblem, tmp_path: Path, capsys: pytest.CaptureFixture[str], **options: Any
) -> str:
    """The one-line refusal of ``entry`` given ``options``; nothing started, nothing written."""
    with pytest.raises(InvalidSettingError) as caught:
        ENTRIES[entry](problem, tmp_path, capsys, options)
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("workers", ["cores + 1", 10**6, 2**31])
def test_more_workers_than_cores_are_refused_before_ray_starts(
    without_ray: None,
    problem: PruningProblem,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    entry: str,
    workers: Any,
) -> None:
    cores = local_cpus()
    count = cores + 1 if workers == "cores + 1" else workers
    message = refused(entry, problem, tmp_path, capsys, workers=count)
    asked = f"{count} environments" if entry == "RayVecEnv" else f"workers {count}"
    assert asked in message.replace("=", " ").replace("--", "")
    assert f"more than this machine can run: it has {cores} CPU cores" in message
    assert f"ask for at most {cores}" in message


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p, cores: RayScorer(p, 2, threads_per_worker=cores), "each worker takes"),
        (lambda p, cores: RayScorer(p, threads_per_worker=cores + 1), "one worker is more than this machine"),
        (lambda p, cores: RayVecEnv([make_env], cpus_per_env=cores + 1), "1 environments is more than"),
    ],
)
def test_workers_of_more_cpus_than_the_machine_has_are_refused(
    without_ray: None, problem: PruningProblem, build: Callable[..., Any], message: str
) -> None:
    with pytest.raises(InvalidSettingError, match=message):
        build(problem, local_cpus())
    assert not ray.is_initialized()


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word (a service that is not Ray)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def no_cluster_on_this_machine() -> None:
    from ray._private import services

    deadline = time.monotonic() + 10
    while services.find_gcs_addresses():  # a Ray just stopped may take a moment to go
        if time.monotonic() > deadline:
            pytest.skip("a Ray cluster runs on this machine: 'auto' would find it")
        time.sleep(0.2)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{free}", "does not answer within 1 s (connection refused)"),
        ("ray://127.0.0.1:{free}", "does not answer within 1 s (connection refused)"),
        ("127.0.0.1:{silent}", "does not answer within 1 s (something listens there, but not Ray)"),
        ("ray://127.0.0.1:{silent}", "does not answer within 1 s (something listens there, but not Ray)"),
        ("auto", 'Ray address "auto"'),  # no cluster, or the last one started is gone
    ],
)
def test_an_address_that_does_not_answer_is_refused_in_bounded_time(
    without_ray: None,
    problem: PruningProblem,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    free_port: int,
    silent_port: int,
    entry: str,
    address: str,
    message: str,
) -> None:
    assert CONNECT_TIMEOUT_S <= 30  # the bound the messages state
    monkeypatch.setattr(optional_ray, "CONNECT_TIMEOUT_S", 1.0)  # the same wait, shortened for the test
    if address == "auto":
        no_cluster_on_this_machine()
    started = time.monotonic()
    said = refused(
        entry, problem, tmp_path, capsys, ray_address=address.format(free=free_port, silent=silent_port)
    )
    assert message in said
    assert time.monotonic() - started < 5  # Ray's own attempts: 30 s (Ray Client) to minutes


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    "address",
    ["", "  ", "local", "head-node", "ray://head-node", "http://head:8265", "h:0", "h:65536", "h:1/x"],
)
def test_a_malformed_address_is_refused_by_the_rule(
    without_ray: None,
    problem: PruningProblem,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    entry: str,
    address: str,
) -> None:
    said = refused(entry, problem, tmp_path, capsys, ray_address=address)
    assert 'must be a Ray address: "auto", HOST:PORT' in said and "ray://HOST:PORT" in said


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nonsense", "the RAY_ADDRESS environment variable must be a Ray address"),
        ("127.0.0.1:{free}", "does not answer within"),
    ],
)
def test_the_ray_address_environment_variable_obeys_the_same_rules(
    without_ray: None,
    problem: PruningProblem,
    monkeypatch: pytest.MonkeyPatch,
    free_port: int,
    value: str,
    message: str,
) -> None:
    # Ray joins the cluster RAY_ADDRESS names when no address is given, so it is checked as one.
    monkeypatch.setenv("RAY_ADDRESS", value.format(free=free_port))
    with pytest.raises(InvalidSettingError, match=message):
        search("random", problem, 4, workers=2)
    assert not ray.is_initialized()


def test_a_scorer_that_started_ray_stops_it_when_closed(without_ray: None, problem: PruningProblem) -> None:
    with RayScorer(problem, workers=2) as scorer:
        pids = ray.get([actor.pid.remote() for actor in scorer.actors])
        assert ray.is_initialized()
    assert not ray.is_initialized()
    assert gone(pids)


def fail_in_a_worker(problem: PruningProblem, folder: Path) -> Any:
    return search("random", marked(problem, folder, fail=True), 8, workers=2)


def interrupt_the_search(problem: PruningProblem, folder: Path) -> Any:
    def interrupt(outcome: Any) -> float:
        raise KeyboardInterrupt  # Ctrl-C while the search runs

    return search("random", marked(problem, folder), 8, workers=2, reward=interrupt)


def fail_in_a_grid_run(problem: PruningProblem, folder: Path) -> Any:
    def fails(evaluator: Any, seed: int = 0) -> None:
        note_pid(folder)
        raise RuntimeError("the agent failed")

    return grid(problem, folder / "grid", agents={"fails": fails}, workers=2)


def fail_in_an_environment(problem: PruningProblem, folder: Path) -> Any:
    def factory() -> Any:
        note_pid(folder)
        raise RuntimeError("the environment failed")

    return RayVecEnv([factory] * 2)


@pytest.mark.parametrize(
    ("run", "raised"),
    [
        (fail_in_a_worker, RuntimeError),
        (interrupt_the_search, KeyboardInterrupt),
        (fail_in_a_grid_run, RuntimeError),
        (fail_in_an_environment, ray.exceptions.RayActorError),  # its actor died making it
    ],
)
def test_no_ray_process_we_started_outlives_an_error_or_an_interrupt(
    without_ray: None,
    problem: PruningProblem,
    tmp_path: Path,
    run: Callable[[PruningProblem, Path], Any],
    raised: type[BaseException],
) -> None:
    with pytest.raises(raised):
        run(problem, tmp_path)
    pids = pids_in(tmp_path)
    assert pids and os.getpid() not in pids  # the failure happened in Ray's worker processes
    assert not ray.is_initialized()
    assert gone(pids)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: search("random", p, 4, workers=3), "workers=3 is more than the Ray cluster this process"),
        (lambda p: RayScorer(p, threads_per_worker=3), "one worker is more than the Ray cluster"),
        (lambda p: RayVecEnv([make_env] * 3), "3 environments is more than the Ray cluster"),
        (lambda p: RayVecEnv([make_env] * 4, cpus_per_env=0.5), None),
    ],
)
def test_a_connected_process_is_held_to_its_clusters_resources(
    local_ray: None, problem: PruningProblem, build: Callable[[PruningProblem], Any], message: str | None
) -> None:
    # The user's Ray has 2 CPUs; actors beyond them would wait for ever. The connection stays the user's.
    if message is None:  # 4 environments at half a CPU each fit
        with pytest.raises(Exception, match="never built"):
            build(problem)
    else:
        with pytest.raises(InvalidSettingError, match=message):
            build(problem)
    assert ray.is_initialized()


@pytest.fixture
def cluster(without_ray: None, free_port: int) -> Iterator[str]:
    """A Ray cluster of 2 CPUs on loopback, as ``ray start --head`` makes one; its head's address."""
    import shutil
    import subprocess

    address = f"127.0.0.1:{free_port}"
    from ray._private.utils import get_ray_address_file

    recorded = Path(get_ray_address_file(None))  # where "auto" looks; ray start writes it and leaves it
    before = recorded.read_text() if recorded.exists() else None
    head = subprocess.Popen(
        [shutil.which("ray") or "ray", "start", "--head", "--block", f"--port={free_port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                optional_ray.check_answers(address)
                optional_ray.check_answers("auto")  # once ray start has recorded the cluster
                break
            except InvalidSettingError:
                if time.monotonic() > deadline or head.poll() is not None:
                    pytest.skip("ray start --head did not come up")
                time.sleep(0.5)
        yield address
    finally:
        head.terminate()  # --block: ending it stops the processes it started
        head.wait(timeout=60)
        if before is None:
            recorded.unlink(missing_ok=True)
        else:
            recorded.write_text(before)


@pytest.mark.slow
def test_a_cluster_is_held_to_its_resources_and_left_running(cluster: str, problem: PruningProblem) -> None:
    # Joined by "auto", as explicitly addressed clusters need the token its head made for this machine.
    with pytest.raises(InvalidSettingError, match=r"workers=3 is more than the Ray cluster .* it has 2 CPUs"):
        RayScorer(problem, workers=3, address="auto")
    assert not ray.is_initialized()  # joined, refused before any actor, left
    with RayScorer(problem, workers=2, address="auto") as scorer:
        keep = tuple(int(k) for k in problem.uniform_keep())
        assert len(scorer.score([keep, keep])) == 2
        pids = ray.get([actor.pid.remote() for actor in scorer.actors])
    assert not ray.is_initialized() and gone(pids)
    optional_ray.check_answers(cluster)  # the cluster itself is not ours to stop


@pytest.mark.parametrize(("agent", "budget"), [("random", 11), ("evolution", 40), ("rlpruner", 12)])
def test_ray_workers_give_the_serial_search(
    local_ray: None, problem: PruningProblem, agent: str, budget: int
) -> None:
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
    local_ray: None, problem: PruningProblem, tmp_path: Path
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
    assert ray.is_initialized()  # the user's connection, not the scorer's to end
    assert (tmp_path / "died").exists()  # a worker did die, mid-task
    assert history(parallel) == history(serial)
    assert evaluator.used == 10 and [e.index for e in parallel.history] == list(range(10))
    assert dying.evaluations == len({e.keep for e in parallel.history})


def test_workers_are_refused_without_sense(problem: PruningProblem) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidSettingError, match="workers"):
            search("random", problem, 4, workers=bad)
    with pytest.raises(InvalidSettingError, match="ray_address"):
        search("random", problem, 4, workers=2, ray_address="")


def test_sb3_trains_on_environments_in_ray_actors(
    local_ray: None, untrained_resnet20: nn.Module, digits: Any
) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    from agents.ray_vec_env import RayVecEnv

    kwargs = {"model": untrained_resnet20, "dataset": digits, "target_macs": 0.5, **QUICK_SCORING}
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


def test_a_benchmark_grid_runs_as_ray_tasks_and_resumes(
    local_ray: None, tmp_path: Path, cached: Path
) -> None:
    import csv

    grid = {"agents": ("uniform", "random"), "evals": 3, "problem_kwargs": QUICK_SCORING, "progress": False}
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


def test_a_cluster_whose_workers_cannot_import_the_package_is_refused_in_one_line(local_ray: None) -> None:
    # A joined cluster's workers run their own Python: without the package every actor would die in its
    # creation task. The check runs one task there; a module the workers lack stands in for the package.
    from prune_env.distributed import check_workers_import

    check_workers_import("the test cluster")  # this package, this version: accepted
    with pytest.raises(InvalidSettingError, match="cannot import no_such_module_anywhere: install prune-env"):
        check_workers_import("the test cluster", module="no_such_module_anywhere")
    assert ray.is_initialized()  # the connection is the caller's to end
