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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.evaluator import BudgetedEvaluator
from agents.registry import NoSettings, available, check_budget_range, resolve_agent, run_agent
from prune_env.app import labels, provenance
from prune_env.app.results import (
    EVAL_FIELDS,
    RUN_FIELDS,
    BenchmarkResults,
    append_csv,
    json_value,
    jsonable,
    read_csv,
    run_key,
    write_csv,
    write_json,
)
from prune_env.app.rundir import RunDirectory
from prune_env.errors import InvalidSettingError
from prune_env.optional_ray import uses_ray
from prune_env.problem import PruningProblem, check_model_arg
from prune_env.rewards import get_reward
from prune_env.settings import ProblemSettings
from prune_env.validation import TARGETS, check_sequence, check_settings, flag

if TYPE_CHECKING:
    from prune_env.data import DataSource
    from prune_env.models import ModelSpec
    from prune_env.quantization import BitPlan
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
        targets: cost budgets as fractions of the base model's ``metric`` ("macs" or "params").
        seeds: one run per agent per seed; the seed is the agent's RNG seed and the fine-tune seed.
            The problem (base model, data split, proxy batches) uses ``problem_kwargs["seed"]`` (default 0)
            for every run, so seeds vary the search, not the problem.
        evals: the evaluation budget of every run.
        reward: a preset name or callable ``Outcome -> float``, the same for every agent.
        finetune_epochs: when > 0, each run's best pruned model is fine-tuned by distillation from the
            base model for this many epochs and scored on the test split (the final report only).
        finetune_samples: fine-tune on this many training examples only: one fixed, seeded subset (the
            problem's seed), the same for every run, so a long fine-tune of many runs stays affordable.
        problem_kwargs: extra :class:`PruningProblem` arguments (``eval_samples``, ``importance``, ...).
        agent_settings: ``{agent label: {setting: value}}`` passed to that agent's function.
        progress: tqdm bar over the grid (and base-model training, if a model is not cached).
        workers: run up to this many runs at once as Ray tasks (``pip install prune-env[ray]``), each
            on its own copy of the problem (built here once per model, dataset and target, sent once);
            rows are written as runs finish, so the files and resuming work as for a serial grid.
        ray_address: a Ray cluster to run the tasks on (``"auto"``, ``"ray://HOST:10001"``); with
            ``workers`` unset, as many at once as the cluster has CPUs.
        allow_mixed: resume a directory whose runs were made by other code (another git revision, or
            ``"unknown"`` for a directory written before revisions were recorded) or with other settings of
            an agent; refused otherwise, naming both values. The table then says what was mixed.

    Returns the results of the whole grid, including runs completed by earlier calls with the same
    ``out`` (which are skipped, not repeated). Results depend only on the arguments and seeds.
    """
    # Every argument is checked before a base model is trained or a file written.
    check_settings(
        {
            "evals": evals,
            "finetune_epochs": finetune_epochs,
            "finetune_samples": finetune_samples,
            "metric": metric,
            "progress": progress,
            "workers": workers,
            "ray_address": ray_address,
        }
    )
    on_ray = uses_ray(workers, ray_address)
    targets = check_sequence("targets", targets, "target")
    seeds = check_sequence("seeds", seeds, "seed")
    get_reward(reward)
    check_problem_kwargs(problem_kwargs or {}, metric)
    flag("allow_mixed", allow_mixed)
    agent_pairs = labels.labelled(available() if agents is None else agents, "agent")
    settings = {str(k): dict(v) for k, v in (agent_settings or {}).items()}
    for label, agent in agent_pairs:
        spec = resolve_agent(agent)
        check_budget_range(spec, None, 1.0, metric)  # an agent that cannot meet this budget's kind
        if spec.settings is not NoSettings or settings.get(label):
            spec.make_settings(settings.get(label, {}))
    record = provenance.make_record(provenance.agent_settings(agent_pairs, settings))
    model_pairs = labels.labelled(models, "model")
    for _, model in model_pairs:
        check_model_arg(model)
    dataset_pairs = labels.labelled(datasets, "dataset")
    reward_label = labels.label(reward, "reward")

    with RunDirectory(out, run_files=(), resume=True, option="out") as rundir:
        return _run_grid(
            rundir,
            agent_pairs,
            model_pairs,
            dataset_pairs,
            targets,
            seeds,
            evals,
            reward,
            reward_label,
            finetune_epochs,
            finetune_samples,
            problem_kwargs,
            settings,
            metric,
            progress,
            (workers, ray_address) if on_ray else None,
            record,
            allow_mixed,
        )


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


def _run_grid(
    rundir: RunDirectory,
    agent_pairs: list[tuple[str, Any]],
    model_pairs: list[tuple[str, Any]],
    dataset_pairs: list[tuple[str, Any]],
    targets: list[float],
    seeds: list[int],
    evals: int,
    reward: Any,
    reward_label: str,
    finetune_epochs: int,
    finetune_samples: int | None,
    problem_kwargs: Mapping[str, Any] | None,
    settings: dict[str, dict[str, Any]],
    metric: str,
    progress: bool,
    ray: tuple[int | None, str | None] | None,
    record: dict[str, Any],
    allow_mixed: bool,
) -> BenchmarkResults:
    """The grid of :func:`run` in a directory this process holds (on Ray: ``(workers, address)``);
    ``record``: this invocation's provenance, kept once it adds a run."""
    from tqdm.auto import tqdm

    out = rundir.path
    runs_csv, evals_csv = out / "runs.csv", out / "evaluations.csv"
    done = BenchmarkResults.load(out)
    for r in done.runs:
        # Mixing budgets or rewards in one directory would make the comparison unequal without saying so.
        if (r["budget_evals"], r["reward"], r["metric"], r["finetune_epochs"]) != (
            evals,
            reward_label,
            metric,
            finetune_epochs,
        ):
            raise InvalidSettingError(
                f"{runs_csv} holds runs with evals={r['budget_evals']}, reward={r['reward']!r}, "
                f"metric={r['metric']!r}, finetune_epochs={r['finetune_epochs']}; this grid asks for "
                f"evals={evals}, reward={reward_label!r}, metric={metric!r}, finetune_epochs={finetune_epochs}. "
                "Use another `out` directory."
            )
    proxy_settings = json.loads(json.dumps(dict(problem_kwargs or {}), default=json_value))
    saved = out / "runs.json"
    if done.runs:
        # Another proxy, base model or fine-tune data scores differently: not comparable. Runs whose settings
        # were not recorded (no runs.json, or one written before a setting was) cannot be shown comparable.
        earlier = done.settings if saved.exists() else {}
        for key, value in (("problem_kwargs", proxy_settings), ("finetune_samples", finetune_samples)):
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
    if done.runs:
        provenance.check_unmixed([*done.records(), {**record, "directory": "this run"}], allow_mixed)
    if len(done.evaluations) != len(read_csv(evals_csv)):
        # Drop the rows of a run interrupted before its run row was written: its rerun writes them again.
        # The file as it was is kept aside first.
        rundir.keep_aside(evals_csv.name)
        write_csv(evals_csv, EVAL_FIELDS, done.evaluations)
    completed = {run_key(r) for r in done.runs}

    grid = [
        (m, d, t, a, s)
        for m in model_pairs
        for d in dataset_pairs
        for t in targets
        for a in agent_pairs
        for s in seeds
    ]
    todo = [g for g in grid if (g[3][0], g[0][0], g[1][0], g[2], g[4]) not in completed]
    meta = {
        "agents": [a for a, _ in agent_pairs],
        "models": [m for m, _ in model_pairs],
        "datasets": [d for d, _ in dataset_pairs],
        "targets": targets,
        "seeds": seeds,
        "evals": evals,
        "reward": reward_label,
        "metric": metric,
        "finetune_epochs": finetune_epochs,
        "finetune_samples": finetune_samples,
        "problem_kwargs": proxy_settings,
        "agent_settings": settings,
    }
    results = done
    results.out, results.settings = out, meta
    this_run = {**record, "directory": str(out)}

    def write_runs_json() -> None:
        # Records derived from old rows are not stored: loading derives them again.
        records = [{k: v for k, v in r.items() if k != "directory"} for r in results.provenance]
        write_json(
            saved, {"settings": meta, "provenance": records, "runs": [jsonable(r) for r in results.runs]}
        )

    if todo and runs_csv.exists() and _header(runs_csv) != list(RUN_FIELDS):
        # Rows made before a column existed (the revision): rewrite the file with every column, blank
        # where unknown, so appended rows line up with the header. The file as it was is kept aside.
        rundir.keep_aside(runs_csv.name)
        write_csv(runs_csv, RUN_FIELDS, done.runs)

    def save(item: GridItem, run_row: dict[str, Any], eval_rows: list[dict[str, Any]]) -> None:
        (m_label, _), (d_label, _), target, (a_label, _), seed = item
        keys = {"agent": a_label, "model": m_label, "dataset": d_label, "target": target, "seed": seed}
        run_row = {
            **keys,
            "metric": metric,
            "reward": reward_label,
            **run_row,
            "revision": record["revision"],
        }
        eval_rows = [{**keys, **e} for e in eval_rows]
        # Evaluations first, then the run row: a run counts as done only once all its rows are on disk.
        append_csv(evals_csv, EVAL_FIELDS, eval_rows)
        append_csv(runs_csv, RUN_FIELDS, [run_row])
        results.runs.append(run_row)
        results.evaluations.extend(eval_rows)
        if not any(r is this_run for r in results.provenance):  # once per invocation, at its first run
            results.provenance.append(this_run)
        write_runs_json()

    def problem_for(item: GridItem) -> PruningProblem:
        (_, model), (_, dataset), target, _, _ = item
        return _problem(model, dataset, target, metric, problem_kwargs, progress)

    def one_run(item: GridItem) -> tuple[Any, ...]:
        _, _, _, (a_label, agent), seed = item
        return (agent, seed, evals, reward, settings.get(a_label, {}), finetune_epochs, finetune_samples)

    with tqdm(total=len(grid), initial=len(grid) - len(todo), desc="benchmark", disable=not progress) as bar:
        if ray is not None:
            _grid_on_ray(todo, problem_for, one_run, save, bar, *ray)
        else:
            problems: dict[tuple[str, str, float], PruningProblem] = {}
            for item in todo:
                (m_label, _), (d_label, _), target, (a_label, _), seed = item
                bar.set_postfix_str(f"{a_label} {m_label}/{d_label} t={target:g} seed={seed}")
                pkey = (m_label, d_label, target)
                if pkey not in problems:
                    problems.clear()  # one problem alive at a time: they hold a model, data and a memo
                    problems[pkey] = problem_for(item)
                save(item, *_one_run(problems[pkey], *one_run(item)))
                bar.update(1)
    if not todo and not saved.exists():
        write_runs_json()
    # Report the requested grid in grid order, even if the directory holds more (an earlier, larger grid).
    order = {(a[0], m[0], d[0], t, s): k for k, (m, d, t, a, s) in enumerate(grid)}
    results.runs = sorted((r for r in results.runs if run_key(r) in order), key=lambda r: order[run_key(r)])
    results.evaluations = sorted(
        (e for e in results.evaluations if run_key(e) in order), key=lambda e: order[run_key(e)]
    )
    return results


GridItem = tuple[tuple[str, Any], tuple[str, Any], float, tuple[str, Any], int]


def _header(path: os.PathLike[str]) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _grid_on_ray(
    todo: list[GridItem],
    problem_for: Callable[[GridItem], PruningProblem],
    one_run: Callable[[GridItem], tuple[Any, ...]],
    save: Callable[[GridItem, dict[str, Any], list[dict[str, Any]]], None],
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
    pending: dict[Any, GridItem] = {}
    try:
        limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        check_cluster_fits(limit, asked=f"workers={limit}", cpus_each=1)
        task = ray.remote(num_cpus=1)(_remote_run)  # Ray retries a run whose worker died
        shared: dict[tuple[str, str, float], Any] = {}  # each problem built here once, sent once
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                item = queue.pop(0)
                pkey = (item[0][0], item[1][0], item[2])
                if pkey not in shared:
                    shared[pkey] = ray.put(problem_for(item))
                pending[task.remote(shared[pkey], *one_run(item))] = item
            finished, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(finished[0])
            save(item, *ray.get(finished[0]))
            bar.update(1)
    except BaseException:
        if not owned:
            for ref in pending:
                ray.cancel(ref, force=True)
        raise
    finally:
        stop_ray(owned)


def _remote_run(problem: PruningProblem, *args: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import torch

    torch.set_num_threads(1)  # a Ray task has one CPU
    return _one_run(problem, *args)


def _problem(
    model: Any,
    dataset: Any,
    target: float,
    metric: str,
    problem_kwargs: Mapping[str, Any] | None,
    progress: bool,
) -> PruningProblem:
    budget = {f"target_{metric}": target}
    settings = ProblemSettings.from_kwargs({"progress": progress, **dict(problem_kwargs or {}), **budget})
    return PruningProblem(model, dataset, settings)


FINETUNE_RECIPE = "finetune_accuracy"
"""Marks a benchmark script's results file whose fine-tunes are :func:`finetune_accuracy`'s; files without
it were made with a script's earlier recipe (from the pruned base model), which scores a policy differently."""


def resumable_results(out: Path, args: Mapping[str, Any]) -> dict[str, Any]:
    """A benchmark script's results file to extend: ``out`` as saved, or a new one recording ``args``; a file
    made with an earlier fine-tune recipe is refused, since its rows would not compare with new ones."""
    if not out.exists():
        return {"args": dict(args), "recipe": FINETUNE_RECIPE, "rows": []}
    saved: dict[str, Any] = json.loads(out.read_text())
    if saved.get("recipe") != FINETUNE_RECIPE:
        raise SystemExit(
            f"{out} was made with this script's earlier fine-tune recipe: use another --out (--report still "
            "reads it)"
        )
    return saved


def finetune_accuracy(
    problem: PruningProblem,
    keep: np.ndarray,
    epochs: int,
    samples: int | None = None,
    seed: int = 0,
    *,
    plan: BitPlan | None = None,
    start: str = "scored",
) -> tuple[float, float]:
    """The harness's final fine-tune of one policy: (validation, test) accuracy after ``epochs`` of
    distillation from the base model on ``samples`` training examples (one fixed subset, the problem's
    seed; ``None``: all of them). Every benchmark script scores its policies here.

    Identical recipe and data for every policy (only ``seed`` differs), so differences come from the
    policies. It starts from the model as the proxy scored it (BatchNorm recalibrated, or the supernet's
    weights for the supernet proxies: the better start, measured); ``start="pruned"``: from the pruned base
    model, only to measure what the start is worth (benchmarks/finetune_start.py). ``plan``: a joint
    policy's bits; the fine-tuned model is quantized as it says (activations calibrated on the quantized
    proxy's batches) before both accuracies are measured.
    """
    from prune_env.errors import InvalidRatiosError
    from prune_env.quantization.bits import check_plan
    from prune_env.quantization.fakequant import calibration_batches, fake_quantize
    from prune_env.quantization.proxy import CALIBRATION_BATCHES
    from prune_env.train import evaluate, finetune

    check_settings({"finetune_epochs": epochs, "finetune_samples": samples, "seed": seed})
    if start not in ("scored", "pruned"):
        raise InvalidSettingError(f"start must be 'scored' (the harness's) or 'pruned', got {start!r}")
    counts = np.asarray(keep)
    fits = counts.shape == problem.units.shape and counts.dtype.kind in "iu"
    # A count below 1 or above its group's units would silently slice the ranking into another policy.
    if not (fits and np.all((counts >= 1) & (counts <= problem.units))):
        raise InvalidRatiosError(
            f"keep must hold one integer count per group, from 1 to its units {problem.units.tolist()} "
            f"(problem.keep_for(ratios) makes them), got {counts.tolist()}"
        )
    model = problem.scored_model(counts) if start == "scored" else problem.build(counts)
    if plan is not None:
        check_plan(plan, model)  # refused before the fine-tune, not after it
    tuned, metrics = finetune(
        model,
        problem.base_model,
        problem.splits.with_training_subset(samples, problem.seed),
        epochs,
        seed=seed,
        progress=False,
        device=problem.device,
    )
    if plan is None:
        return float(metrics["val_accuracy"]), float(metrics["test_accuracy"])
    batches = calibration_batches(problem.splits.train, CALIBRATION_BATCHES, seed=problem.seed)
    quantized = fake_quantize(tuned, plan, batches)  # the fine-tuned copy is this function's own
    val, test = (
        evaluate(quantized, s, device=problem.device)["accuracy"]
        for s in (problem.splits.val, problem.splits.test)
    )
    return float(val), float(test)


def _one_run(
    problem: PruningProblem,
    agent: Any,
    seed: int,
    evals: int,
    reward: Any,
    settings: Mapping[str, Any],
    finetune_epochs: int,
    finetune_samples: int | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    start = time.perf_counter()
    result = run_agent(agent, BudgetedEvaluator(problem, evals, reward), seed, **settings)
    best = result.best_outcome
    val_acc = test_acc = math.nan
    if finetune_epochs > 0:
        val_acc, test_acc = finetune_accuracy(
            problem, result.best_keep, finetune_epochs, finetune_samples, seed
        )
    row = {
        "budget_evals": evals,
        "evals_used": len(result.history),
        "best_reward": float(result.best_reward),
        "best_accuracy": float(best.accuracy),
        "macs_ratio": float(best.macs_ratio),
        "params_ratio": float(best.params_ratio),
        "base_accuracy": float(problem.base_accuracy),
        "finetune_epochs": finetune_epochs,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "seconds": time.perf_counter() - start,
        "ratios": " ".join(f"{r:.4f}" for r in np.asarray(best.ratios).reshape(-1)),
        "keep": " ".join(str(int(k)) for k in best.keep),
    }
    if problem.metric == "latency":
        # The budget was a prediction: the chosen model is measured beside it (its architecture, not its
        # fine-tuned weights, sets its speed), with the base model right after it for the speed-up.
        keep = np.asarray(result.best_keep, dtype=np.int64)
        check = problem.check_latency(keep, problem.build(keep))
        row["latency_ratio"] = float(best.latency_ratio)
        row.update({k: int(v) if isinstance(v, bool) else v for k, v in check.fields().items()})
    return row, [e.as_row() for e in result.history]
