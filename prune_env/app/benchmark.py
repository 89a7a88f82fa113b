"""Benchmark harness: run a grid of agents × models × datasets × targets × seeds at equal evaluation budgets.

::

    from prune_env.app import benchmark

    results = benchmark.run(["uniform", "random", "ppo"], targets=(0.3, 0.5), seeds=(0, 1, 2), evals=100)
    print(results.table())
    results.plot_pareto("pareto.png")
    results.plot_curves("curves.png")

For each (model, dataset, target) ONE :class:`~prune_env.problem.PruningProblem` is built and shared by
every agent and seed, so all runs see the same base model, dependency graph, channel ranking and proxy;
every agent then gets a fresh :class:`~agents.evaluator.BudgetedEvaluator` with the same budget. Optionally each
run's best policy is fine-tuned identically (knowledge distillation from the base model) and scored on the
test split — the only place the test split is read.

Results are tidy files under ``out``: ``runs.csv`` (one row per run), ``evaluations.csv`` (one row per
evaluation, keyed by the run's columns) and ``runs.json`` (the run rows plus the grid settings). A run's
rows are written as soon as it finishes, so an interrupted grid loses at most the run in progress, and
calling :func:`run` again with the same ``out`` skips every run already in ``runs.csv``.

Each directory records where its results came from (:mod:`prune_env.app.provenance`): ``runs.json`` keeps
one record per invocation that added runs (git revision, library versions, hardware, torch threads, the
command line and every agent's full settings) and each run row its revision. Resuming with other code or
other agent settings is refused unless ``allow_mixed=True``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.evaluator import BudgetedEvaluator
from agents.registry import NoSettings, available, check_budget_range, resolve_agent, run_agent
from prune_env.app import labels, provenance
from prune_env.app.final_latency import guarded_keep, latency_fields
from prune_env.app.finetune_recipe import finetune_accuracy
from prune_env.app.results import BenchmarkResults
from prune_env.app.rundir import RunDirectory
from prune_env.app.tidy_files import (
    EVAL_FIELDS,
    RUN_FIELDS,
    RunKey,
    append_csv,
    json_value,
    jsonable,
    read_csv,
    run_key,
    write_csv,
    write_json,
)
from prune_env.errors import InvalidSettingError
from prune_env.optional_ray import uses_ray
from prune_env.problem import PruningProblem
from prune_env.problem_inputs import check_model_arg
from prune_env.rewards import get_reward
from prune_env.settings import ProblemSettings
from prune_env.validation import TARGETS, check_sequence, check_settings, flag

if TYPE_CHECKING:
    from prune_env.data import DataSource
    from prune_env.models import ModelSpec
    from prune_env.rewards import RewardFn

# ------------------------------------------------------------------------------------------------ run


def run(
    agents: Sequence[str | Callable[..., None]] | Mapping[str, str | Callable[..., None]] | None = None,
    models: Sequence[ModelSpec] | Mapping[str, ModelSpec] = ("resnet20",),
    datasets: Sequence[DataSource] | Mapping[str, DataSource] = ("digits",),
    targets: Sequence[float] = (0.5,),
    seeds: Sequence[int] = (0,),
    evals: int = 50,
    out: str | os.PathLike[str] = "runs/benchmark",
    reward: str | RewardFn = "acc",
    finetune_epochs: int = 0,
    finetune_samples: int | None = None,
    problem_kwargs: Mapping[str, Any] | None = None,
    agent_settings: Mapping[str, Mapping[str, Any]] | None = None,
    metric: str = "macs",
    progress: bool = True,
    workers: int | None = None,
    ray_address: str | None = None,
    allow_mixed: bool = False,
) -> BenchmarkResults:
    """Run every agent × seed on every (model, dataset, target) and save tidy results under ``out``.

    Args:
        agents: registered agent names, agent functions, or a ``{label: agent}`` mapping; ``None`` runs
            every agent in :func:`agents.available`.
        models: zoo names, factories or trained ``nn.Module`` s (see :class:`PruningProblem`); use a
            ``{label: model}`` mapping to name non-string models in the results.
        datasets: names for :func:`prune_env.data.load` or :class:`~prune_env.data.Splits`.
        targets: budgets as fractions of the base model's ``metric`` (MACs, parameters or latency).
        seeds: one run per agent per seed, the agent's and the fine-tune's seed; the problem (base model,
            split, proxy batches) has ``problem_kwargs["seed"]`` (default 0): seeds vary the search only.
        evals: the evaluation budget of every run.
        reward: a preset name or callable ``Outcome -> float``, the same for every agent.
        finetune_epochs: when > 0, each run's best pruned model is fine-tuned by distillation from the
            base model for this many epochs and scored on validation and test (the final report only).
        finetune_samples: fine-tune on this many training examples: one fixed subset for every run.
        problem_kwargs: extra :class:`PruningProblem` arguments (``eval_samples``, ``importance``, ...).
        agent_settings: ``{agent label: {setting: value}}`` passed to that agent's function.
        progress: tqdm bar over the grid (and base-model training, if a model is not cached).
        workers: run up to this many runs at once as Ray tasks (``pip install prune-env[ray]``), each problem
            built here once and sent once; rows are written as runs finish, as for a serial grid.
        ray_address: a Ray cluster for the tasks (``"auto"``, ``"ray://HOST:10001"``), all its CPUs by default.
        allow_mixed: resume a directory whose runs were made by other code (git revision) or other settings
            of an agent; refused otherwise, naming both values. The table then says what was mixed.

    Returns every run of the grid, those of earlier calls with the same ``out`` included (not repeated).
    """
    # Every argument is checked before a base model is trained or a file written.
    check_settings({"evals": evals, "finetune_epochs": finetune_epochs, "finetune_samples": finetune_samples})
    check_settings({"metric": metric, "progress": progress, "workers": workers, "ray_address": ray_address})
    get_reward(reward)
    check_problem_kwargs(problem_kwargs or {}, metric)
    flag("allow_mixed", allow_mixed)
    agent_pairs = labels.labelled(available() if agents is None else agents, "agent")
    settings = _checked_agent_settings(agent_pairs, agent_settings or {}, metric)
    model_pairs = labels.labelled(models, "model")
    for _, model in model_pairs:
        check_model_arg(model)
    grid = GridSpec(
        agents=agent_pairs,
        models=model_pairs,
        datasets=labels.labelled(datasets, "dataset"),
        targets=check_sequence("targets", targets, "target"),
        seeds=check_sequence("seeds", seeds, "seed"),
        evals=evals,
        reward=reward,
        reward_label=labels.label(reward, "reward"),
        finetune_epochs=finetune_epochs,
        finetune_samples=finetune_samples,
        problem_kwargs=dict(problem_kwargs or {}),
        agent_settings=settings,
        metric=metric,
        progress=progress,
        ray=(workers, ray_address) if uses_ray(workers, ray_address) else None,
        record=provenance.make_record(provenance.agent_settings(agent_pairs, settings)),
        allow_mixed=allow_mixed,
    )
    with RunDirectory(out, run_files=(), resume=True, option="out") as rundir:
        return _run_grid(rundir, grid)


def _checked_agent_settings(
    agent_pairs: list[tuple[str, Any]], agent_settings: Mapping[str, Mapping[str, Any]], metric: str
) -> dict[str, dict[str, Any]]:
    """Each agent's settings as plain dicts, checked by the agent's settings class; an agent that cannot meet
    a budget of ``metric`` is refused."""
    settings = {str(k): dict(v) for k, v in agent_settings.items()}
    for label, agent in agent_pairs:
        spec = resolve_agent(agent)
        check_budget_range(spec, None, 1.0, metric)
        if spec.settings is not NoSettings or settings.get(label):
            spec.make_settings(settings.get(label, {}))
    return settings


def check_problem_kwargs(problem_kwargs: Mapping[str, Any], metric: str = "macs") -> None:
    """Keys must be :class:`ProblemSettings` fields other than the budget (the grid sets the target);
    values obey the shared rules, checked with a budget of ``metric`` (a latency batch means something
    only beside a latency budget)."""
    budget = sorted(set(TARGETS) & set(problem_kwargs))
    if budget:
        raise InvalidSettingError(
            f"problem_kwargs sets {', '.join(budget)}; the grid's targets and metric set the budget"
        )
    ProblemSettings.from_kwargs({**problem_kwargs, f"target_{metric}": 0.5})


@dataclass(frozen=True, eq=False)
class GridRun:
    """One run of a grid: an agent at a seed on one (model, dataset, target) problem, with the labels the
    results name them by."""

    model_label: str
    model: Any
    dataset_label: str
    dataset: Any
    target: float
    agent_label: str
    agent: Any
    seed: int

    @property
    def key(self) -> RunKey:
        return (self.agent_label, self.model_label, self.dataset_label, self.target, self.seed)

    @property
    def problem_key(self) -> tuple[str, str, float]:
        """Runs with the same problem key share one :class:`PruningProblem`."""
        return (self.model_label, self.dataset_label, self.target)

    def columns(self) -> dict[str, Any]:
        """The columns that name this run in ``runs.csv`` and ``evaluations.csv``."""
        return {
            "agent": self.agent_label,
            "model": self.model_label,
            "dataset": self.dataset_label,
            "target": self.target,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class RunRequest:
    """What one run needs besides its problem (sent to a Ray worker as is)."""

    agent: Any
    seed: int
    evals: int
    reward: Any
    agent_settings: Mapping[str, Any]
    finetune_epochs: int
    finetune_samples: int | None


@dataclass(frozen=True)
class GridSpec:
    """A grid's checked arguments (:func:`run`): what it runs and the settings every run shares.

    ``ray``: ``(workers, address)`` when the runs go to Ray; ``record``: this invocation's provenance."""

    agents: list[tuple[str, Any]]
    models: list[tuple[str, Any]]
    datasets: list[tuple[str, Any]]
    targets: list[float]
    seeds: list[int]
    evals: int
    reward: Any
    reward_label: str
    finetune_epochs: int
    finetune_samples: int | None
    problem_kwargs: Mapping[str, Any]
    agent_settings: dict[str, dict[str, Any]]
    metric: str
    progress: bool
    ray: tuple[int | None, str | None] | None
    record: dict[str, Any]
    allow_mixed: bool

    def runs(self) -> list[GridRun]:
        """Every run of the grid, in grid order (model, dataset, target, agent, seed)."""
        return [
            GridRun(m_label, model, d_label, dataset, t, a_label, agent, s)
            for m_label, model in self.models
            for d_label, dataset in self.datasets
            for t in self.targets
            for a_label, agent in self.agents
            for s in self.seeds
        ]

    def request(self, run: GridRun) -> RunRequest:
        return RunRequest(
            run.agent,
            run.seed,
            self.evals,
            self.reward,
            self.agent_settings.get(run.agent_label, {}),
            self.finetune_epochs,
            self.finetune_samples,
        )

    def problem(self, run: GridRun) -> PruningProblem:
        budget = {f"target_{self.metric}": run.target}
        settings = ProblemSettings.from_kwargs({"progress": self.progress, **self.problem_kwargs, **budget})
        return PruningProblem(run.model, run.dataset, settings)

    def proxy_settings(self) -> dict[str, Any]:
        """The problem settings as plain JSON (how ``runs.json`` records and compares them)."""
        return json.loads(json.dumps(dict(self.problem_kwargs), default=json_value))

    def meta(self) -> dict[str, Any]:
        """The grid settings ``runs.json`` records."""
        return {
            "agents": [a for a, _ in self.agents],
            "models": [m for m, _ in self.models],
            "datasets": [d for d, _ in self.datasets],
            "targets": self.targets,
            "seeds": self.seeds,
            "evals": self.evals,
            "reward": self.reward_label,
            "metric": self.metric,
            "finetune_epochs": self.finetune_epochs,
            "finetune_samples": self.finetune_samples,
            "problem_kwargs": self.proxy_settings(),
            "agent_settings": self.agent_settings,
        }


def _run_grid(rundir: RunDirectory, spec: GridSpec) -> BenchmarkResults:
    """The grid of :func:`run` in a directory this process holds: the runs not yet in it, then every run of
    the grid, read back in grid order."""
    from tqdm.auto import tqdm

    results = BenchmarkResults.load(rundir.path)
    _check_comparable(results, spec, rundir.path)
    _drop_unfinished_evaluations(rundir, results)
    completed = {run_key(r) for r in results.runs}
    grid = spec.runs()
    todo = [r for r in grid if r.key not in completed]
    writer = _GridWriter(rundir, results, spec)
    if todo:
        writer.upgrade_header()
    with tqdm(
        total=len(grid), initial=len(grid) - len(todo), desc="benchmark", disable=not spec.progress
    ) as bar:
        if spec.ray is not None:
            _grid_on_ray(todo, spec, writer.save, bar, *spec.ray)
        else:
            _grid_here(todo, spec, writer.save, bar)
    if not todo and not writer.saved.exists():
        writer.write_runs_json()
    # Report the requested grid in grid order, even if the directory holds more (an earlier, larger grid).
    order = {r.key: k for k, r in enumerate(grid)}
    results.runs = sorted((r for r in results.runs if run_key(r) in order), key=lambda r: order[run_key(r)])
    results.evaluations = sorted(
        (e for e in results.evaluations if run_key(e) in order), key=lambda e: order[run_key(e)]
    )
    return results


def _check_comparable(done: BenchmarkResults, spec: GridSpec, out: Path) -> None:
    """Runs already in ``out`` must compare with this grid's: the same evaluation budget, reward, metric,
    fine-tune and problem settings, made by the same code and agent settings (unless ``allow_mixed``)."""
    if not done.runs:
        return
    runs_csv = out / "runs.csv"
    for r in done.runs:
        # Mixing budgets or rewards in one directory would make the comparison unequal without saying so.
        if (r["budget_evals"], r["reward"], r["metric"], r["finetune_epochs"]) != (
            spec.evals,
            spec.reward_label,
            spec.metric,
            spec.finetune_epochs,
        ):
            raise InvalidSettingError(
                f"{runs_csv} holds runs with evals={r['budget_evals']}, reward={r['reward']!r}, "
                f"metric={r['metric']!r}, finetune_epochs={r['finetune_epochs']}; this grid asks for "
                f"evals={spec.evals}, reward={spec.reward_label!r}, metric={spec.metric!r}, "
                f"finetune_epochs={spec.finetune_epochs}. Use another `out` directory."
            )
    # Another proxy, base model or fine-tune data scores differently: not comparable. Runs whose settings
    # were not recorded (no runs.json, or one written before a setting was) cannot be shown comparable.
    saved = out / "runs.json"
    earlier = done.settings if saved.exists() else {}
    for key, value in (
        ("problem_kwargs", spec.proxy_settings()),
        ("finetune_samples", spec.finetune_samples),
    ):
        if key not in earlier:
            raise InvalidSettingError(
                f"{out} holds runs whose {key} is not recorded ({saved.name} is missing or predates it), "
                "so they cannot be shown comparable with this grid's. Use another `out` directory."
            )
        if earlier[key] != value:
            raise InvalidSettingError(
                f"{saved} was made with {key}={earlier[key]}, this grid asks for {value}. "
                "Use another `out` directory."
            )
    provenance.check_unmixed([*done.records(), {**spec.record, "directory": "this run"}], spec.allow_mixed)


def _drop_unfinished_evaluations(rundir: RunDirectory, done: BenchmarkResults) -> None:
    """Drop the evaluation rows of a run interrupted before its run row was written (its rerun writes them
    again); the file as it was is kept aside first."""
    evals_csv = rundir.path / "evaluations.csv"
    if len(done.evaluations) != len(read_csv(evals_csv)):
        rundir.keep_aside(evals_csv.name)
        write_csv(evals_csv, EVAL_FIELDS, done.evaluations)


class _GridWriter:
    """Appends each finished run's rows to the grid's files and keeps ``runs.json`` and ``results`` current.

    Evaluations are written first, then the run row: a run counts as done only once all its rows are on disk.
    """

    def __init__(self, rundir: RunDirectory, results: BenchmarkResults, spec: GridSpec) -> None:
        self.rundir = rundir
        self.results = results
        self.spec = spec
        self.runs_csv = rundir.path / "runs.csv"
        self.evals_csv = rundir.path / "evaluations.csv"
        self.saved = rundir.path / "runs.json"
        self.meta = spec.meta()
        self.this_run = {**spec.record, "directory": str(rundir.path)}
        results.out, results.settings = rundir.path, self.meta

    def upgrade_header(self) -> None:
        """Rows made before a column existed (the revision, the latency columns): rewrite the file with every
        column, blank where unknown, so appended rows line up with the header. The old file is kept aside."""
        if self.runs_csv.exists() and _header(self.runs_csv) != list(RUN_FIELDS):
            self.rundir.keep_aside(self.runs_csv.name)
            write_csv(self.runs_csv, RUN_FIELDS, self.results.runs)

    def write_runs_json(self) -> None:
        # Records derived from old rows are not stored: loading derives them again.
        records = [{k: v for k, v in r.items() if k != "directory"} for r in self.results.provenance]
        runs = [jsonable(r) for r in self.results.runs]
        write_json(self.saved, {"settings": self.meta, "provenance": records, "runs": runs})

    def save(self, run: GridRun, run_row: dict[str, Any], eval_rows: list[dict[str, Any]]) -> None:
        columns = run.columns()
        run_row = {
            **columns,
            "metric": self.spec.metric,
            "reward": self.spec.reward_label,
            **run_row,
            "revision": self.spec.record["revision"],
        }
        eval_rows = [{**columns, **e} for e in eval_rows]
        append_csv(self.evals_csv, EVAL_FIELDS, eval_rows)
        append_csv(self.runs_csv, RUN_FIELDS, [run_row])
        self.results.runs.append(run_row)
        self.results.evaluations.extend(eval_rows)
        if not any(r is self.this_run for r in self.results.provenance):  # once per invocation
            self.results.provenance.append(self.this_run)
        self.write_runs_json()


SaveRun = Callable[[GridRun, dict[str, Any], list[dict[str, Any]]], None]


def _header(path: os.PathLike[str]) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _grid_here(todo: list[GridRun], spec: GridSpec, save: SaveRun, bar: Any) -> None:
    """The runs one after another in this process, one problem alive at a time (a problem holds a model,
    data and a memo)."""
    problem: tuple[tuple[str, str, float], PruningProblem] | None = None
    for run in todo:
        bar.set_postfix_str(
            f"{run.agent_label} {run.model_label}/{run.dataset_label} t={run.target:g} seed={run.seed}"
        )
        if problem is None or problem[0] != run.problem_key:
            problem = None  # the last one is released before the next is built
            problem = (run.problem_key, spec.problem(run))
        save(run, *_one_run(problem[1], spec.request(run)))
        bar.update(1)


def _grid_on_ray(
    todo: list[GridRun],
    spec: GridSpec,
    save: SaveRun,
    bar: Any,
    workers: int | None,
    address: str | None,
) -> None:
    """The runs as Ray tasks, at most ``workers`` at a time; each run's rows are saved as it finishes.

    A Ray started (or joined) here is stopped on every way out; on a Ray the process was already connected
    to, the runs still pending are cancelled instead.
    """
    from prune_env.distributed import check_cluster_fits, start_ray, stop_ray
    from prune_env.optional_ray import import_ray

    ray = import_ray()
    owned = start_ray(workers, address)
    pending: dict[Any, GridRun] = {}
    try:
        limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        check_cluster_fits(limit, asked=f"workers={limit}", cpus_each=1)
        task = ray.remote(num_cpus=1)(_remote_run)  # Ray retries a run whose worker died
        shared: dict[tuple[str, str, float], Any] = {}  # each problem built here once, sent once
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                run = queue.pop(0)
                if run.problem_key not in shared:
                    shared[run.problem_key] = ray.put(spec.problem(run))
                pending[task.remote(shared[run.problem_key], spec.request(run))] = run
            finished, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(finished[0])
            save(run, *ray.get(finished[0]))
            bar.update(1)
    except BaseException:
        if not owned:
            for ref in pending:
                ray.cancel(ref, force=True)
        raise
    finally:
        stop_ray(owned)


def _remote_run(problem: PruningProblem, request: RunRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import torch

    torch.set_num_threads(1)  # a Ray task has one CPU
    return _one_run(problem, request)


def _one_run(problem: PruningProblem, request: RunRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run on ``problem``: the agent's search, then the final fine-tune of its best policy (and, under a
    latency budget, the measurement of its model); the run row and the evaluation rows."""
    r = request
    start = time.perf_counter()
    result = run_agent(r.agent, BudgetedEvaluator(problem, r.evals, r.reward), r.seed, **r.agent_settings)
    best = result.best_outcome
    # Before the fine-tune: the chosen policy, measured above its target (latency_guard), is replaced by the
    # same policy projected onto a lower predicted budget; that one is fine-tuned.
    keep, fit = guarded_keep(problem, np.asarray(result.best_keep, dtype=np.int64))
    if fit is not None and fit.steps:
        best = problem.outcome(keep, accuracy=math.nan, loss=math.nan)
    val_acc = test_acc = math.nan
    if r.finetune_epochs > 0:
        val_acc, test_acc = finetune_accuracy(problem, keep, r.finetune_epochs, r.finetune_samples, r.seed)
    row = {
        "budget_evals": r.evals,
        "evals_used": len(result.history),
        "best_reward": float(result.best_reward),
        "best_accuracy": float(result.best_outcome.accuracy),
        "macs_ratio": float(best.macs_ratio),
        "params_ratio": float(best.params_ratio),
        "base_accuracy": float(problem.base_accuracy),
        "finetune_epochs": r.finetune_epochs,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "seconds": time.perf_counter() - start,
        "ratios": " ".join(f"{r:.4f}" for r in np.asarray(best.ratios).reshape(-1)),
        "keep": " ".join(str(int(k)) for k in best.keep),
    }
    if problem.metric == "latency":
        # The budget was a prediction: the chosen model is measured beside it (its architecture, not its
        # fine-tuned weights, sets its speed), with the base model right after it for the speed-up.
        row["latency_ratio"] = float(best.latency_ratio)
        row.update(latency_fields(problem, keep, problem.build(keep), fit))
        if fit is not None and fit.steps:
            row["searched_keep"] = " ".join(str(int(k)) for k in result.best_keep)
    return row, [e.as_row() for e in result.history]
