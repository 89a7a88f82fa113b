"""Run (a chunk of) a benchmark grid whose settings were fixed in a committed file, and report it.

A grid file (``benchmarks/grids/*.json``) names the dataset, the settings (model, budget metric, target),
the agents with their seeds, the evaluation budget, the proxy and the fine-tune. It is committed before any
run, so no setting is chosen after seeing an accuracy; this script only lets a run pick WHICH part of the
file to run now (``--settings``, ``--agents``, ``--seeds`` must name parts of it), never other values.

    python benchmarks/grid.py benchmarks/grids/allocation_baselines_fashion.json \\
        --out benchmarks/results/allocation_baselines_fashion --settings vgg11_quarter-macs-0.05 \\
        --agents uniform global knapsack
    python benchmarks/grid.py benchmarks/grids/allocation_baselines_fashion.json \\
        --out benchmarks/results/allocation_baselines_fashion --report

Each (setting, agent) runs in its own directory ``OUT/SETTING/AGENT`` through the harness
(:func:`prune_env.app.benchmark.run`), so a chunk resumes where it was interrupted, and two processes may
run different chunks at once (different settings at once is cheaper: each setting trains its proxy once,
then loads it from the cache). ``OUT/grid.json`` holds the grid file as it was when the first chunk ran
(and that chunk's revision, versions, hardware and command); a later chunk with a different file is refused. ``--report`` combines every directory of a setting, prints
its table (paired differences against uniform, random and the best non-learned baseline, validation and
test) and the grid's goals, and draws ``OUT/SETTING/allocations.png``: the per-group ratios of each
agent's policies.

Under a latency budget each run measures its final model as it finishes, beside whatever else runs then (a
second chunk on the other core). ``--remeasure``, run alone on the machine once the runs are done, measures
every final model of the latency settings again, one after another, each beside the unpruned model, and
writes ``OUT/SETTING/latency_remeasured.json`` (``--rounds N``: each N times, the median round kept, every
round's ratio recorded; the load average before and after each; resumed where it stopped); ``--report``
then prints both measurements' verdicts. ``--remeasure --guard`` applies the latency guard
(:mod:`prune_env.latency.guard`) to every final model instead -- what it would have done to the runs' choices,
without a new fine-tune: each re-projection, measured ratio and the final kept counts, into
``OUT/SETTING/latency_guarded.json``.

    python benchmarks/grid.py benchmarks/grids/latency_baselines_fashion.json \\
        --out benchmarks/results/latency_baselines_fashion --remeasure --rounds 5 [--guard]
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prune_env.errors import InvalidSettingError
from prune_env.serialize import loads_strict

if TYPE_CHECKING:
    from prune_env.app.results import BenchmarkResults

GRID_KEYS = {
    "description": str,
    "dataset": str,
    "evals": int,
    "finetune_epochs": int,
    "finetune_samples": int,
    "threads": int,
    "problem": dict,
    "settings": list,
    "agents": dict,
    "cut_first": list,
    "agent_settings": dict,
}
SETTING_KEYS = {"name": str, "model": str, "metric": str, "target": float}
RECORD = "grid.json"
REMEASURED = "latency_remeasured.json"  # per setting: the final models measured again, alone
GUARDED = "latency_guarded.json"  # per setting: the latency guard applied to the final models, alone


def read_grid(path: Path) -> dict[str, Any]:
    """The grid file, parsed strictly and checked key by key (a typo would otherwise run another grid)."""
    try:
        grid = loads_strict(path.read_bytes())
    except OSError as exc:
        raise InvalidSettingError(f"cannot read the grid file {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidSettingError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(grid, dict):
        raise InvalidSettingError(
            f"{path} holds a JSON {type(grid).__name__}, not an object of grid settings"
        )
    _check_keys(grid, GRID_KEYS, str(path))
    for i, setting in enumerate(grid["settings"]):
        if not isinstance(setting, dict):
            raise InvalidSettingError(f"{path}: settings[{i}] must be an object, got {setting!r}")
        _check_keys(setting, SETTING_KEYS, f"{path}: settings[{i}]")
    names = [s["name"] for s in grid["settings"]]
    if len(set(names)) != len(names):
        raise InvalidSettingError(f"{path}: setting names must be unique, got {names}")
    for agent, seeds in grid["agents"].items():
        if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
            raise InvalidSettingError(f"{path}: agents[{agent!r}] must be a non-empty list of int seeds")
    return grid


def _check_keys(obj: Mapping[str, Any], keys: Mapping[str, type], where: str) -> None:
    unknown, missing = sorted(set(obj) - set(keys)), sorted(set(keys) - set(obj))
    if unknown or missing:
        raise InvalidSettingError(
            f"{where}: unknown keys {unknown}, missing keys {missing}; expected exactly {sorted(keys)}"
        )
    for key, kind in keys.items():
        value = obj[key]
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is float
            else (isinstance(value, kind) and not isinstance(value, bool))
        )
        if not ok:
            raise InvalidSettingError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")


def _chosen(asked: Sequence[Any] | None, available: Sequence[Any], what: str) -> list[Any]:
    """The part of the grid asked for: every value must be one the file has."""
    if asked is None:
        return list(available)
    extra = [a for a in asked if a not in available]
    if not asked or extra:
        raise InvalidSettingError(
            f"--{what} must name {what} of the grid file: {extra or 'none'} are not in it; it has "
            f"{list(available)}"
        )
    return [a for a in available if a in asked]  # the file's order


def record_grid(out: Path, path: Path, raw: bytes) -> None:
    """``OUT/grid.json``: the grid file as the first chunk ran it. A chunk run with another file is
    refused: results of two grids in one directory would be reported as one."""
    from prune_env.app.measure import write_results

    digest = hashlib.sha256(raw).hexdigest()
    record = out / RECORD
    if record.exists():
        before = loads_strict(record.read_bytes())
        if before.get("sha256") != digest:
            raise InvalidSettingError(
                f"{record} records grid file {before.get('file')} with sha256 {before.get('sha256')}, but "
                f"{path} has sha256 {digest}: its settings changed after runs were made. Use another --out."
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_results(record, {"file": str(path), "sha256": digest, "grid": loads_strict(raw)})


def run_chunk(grid: Mapping[str, Any], out: Path, settings: list[dict[str, Any]], agents: list[str],
              seeds: list[int] | None, progress: bool) -> None:  # fmt: skip
    import torch

    from prune_env.app import benchmark

    torch.set_num_threads(grid["threads"])
    for setting in settings:
        for agent in agents:
            agent_seeds = [s for s in grid["agents"][agent] if seeds is None or s in seeds]
            if not agent_seeds:
                continue  # this agent has none of the seeds asked for (fewer seeds in the file)
            benchmark.run(
                [agent],
                models=[setting["model"]],
                datasets=[grid["dataset"]],
                targets=[float(setting["target"])],
                metric=setting["metric"],
                seeds=agent_seeds,
                evals=grid["evals"],
                out=out / setting["name"] / agent,
                finetune_epochs=grid["finetune_epochs"],
                finetune_samples=grid["finetune_samples"],
                problem_kwargs=grid["problem"],
                agent_settings={agent: grid["agent_settings"].get(agent, {})},
                progress=progress,
            )


def report(out: Path, settings: list[dict[str, Any]], allow_mixed: bool = False) -> None:
    """Print the grid's table and goals and write ``OUT/paired.csv`` and each setting's allocation plot.

    Each setting's agent directories are combined apart (a setting's runs share a budget metric, which
    :meth:`BenchmarkResults.combine` requires); the table, the Holm correction and the goals then span
    every setting at once, as the grid's claims do."""
    from prune_env.app.allocations import plot_allocations
    from prune_env.app.results import BenchmarkResults, latency_lines

    record = loads_strict((out / RECORD).read_bytes()) if (out / RECORD).exists() else {}
    print(f"grid file {record.get('file', '?')} (sha256 {str(record.get('sha256', '?'))[:12]})")
    runs: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    remeasured: list[dict[str, Any]] = []
    guarded: list[dict[str, Any]] = []
    for setting in settings:
        results = setting_results(out, setting, allow_mixed)
        if results is None:
            print(f"{setting['name']}: no runs yet")
            continue
        runs += results.runs
        if (out / setting["name"] / REMEASURED).exists():
            remeasured += loads_strict((out / setting["name"] / REMEASURED).read_bytes())["runs"]
        if (out / setting["name"] / GUARDED).exists():
            guarded += loads_strict((out / setting["name"] / GUARDED).read_bytes())["runs"]
        records += results.records()
        plot_allocations(results, out / setting["name"] / "allocations.png")
    if not runs:
        return
    grid = BenchmarkResults(runs, [], out, {}, records)
    revisions = sorted({str(r.get("revision")) for r in grid.records()})
    print(f"revisions: {', '.join(revisions)}\n")
    print(grid.table(references=("uniform", "random")))
    print()
    print(grid.verdicts())
    if remeasured:
        print("\nthe final models measured again, alone on the machine (--remeasure):")
        print("\n".join(latency_lines(remeasured)))
    if guarded:
        print("\nthe latency guard applied to the final models, alone on the machine (--remeasure --guard):")
        print("\n".join(latency_lines(guarded)))
        steps = [int(r["latency_guard_steps"]) for r in guarded]
        print(f"re-projected: {sum(s > 0 for s in steps)} of {len(steps)}; steps {sorted(steps)}")
    print(f"\npaired differences: {grid.write_paired(out / 'paired.csv')}")


def setting_results(out: Path, setting: Mapping[str, Any], allow_mixed: bool) -> BenchmarkResults | None:
    """Every run of ``setting``: its agent directories combined (``None`` before the first run)."""
    from prune_env.app.results import BenchmarkResults

    parts = sorted(d for d in (out / setting["name"]).glob("*") if (d / "runs.csv").exists())
    if not parts:
        return None
    return BenchmarkResults.combine([BenchmarkResults.load(d) for d in parts], allow_mixed)


def remeasure(grid: Mapping[str, Any], out: Path, settings: list[dict[str, Any]], allow_mixed: bool,
              progress: bool = True, rounds: int = 1, guard: bool = False) -> None:  # fmt: skip
    """Measure the final model of every run of the latency ``settings`` again by its table's protocol, the
    unpruned model right after it, ``rounds`` times, in this process alone; write
    ``OUT/SETTING/latency_remeasured.json``: each run's identity and kept counts, the fields of its median
    round (by measured ratio to the unpruned model; one measurement's spread understates how far two
    measurements of one model differ), every round's ratio, the load average before and after. A run at a
    time, so an interrupted pass resumes. The problem is built as the runs built it (the same cached base
    model, channel ranking and latency table), except for its proxy: nothing is scored, so the cheapest one
    stands in for a trained proxy that might otherwise be trained anew. Runs made on another CPU or torch are
    refused, and so is a table that predicts other milliseconds than the runs' (one measured anew).
    ``guard``: apply the latency guard to each final model instead (``rounds`` per measurement) and write
    ``OUT/SETTING/latency_guarded.json``: its fields and the kept counts it ended with."""
    import torch
    from tqdm.auto import tqdm

    from prune_env.app.measure import load_average, write_results
    from prune_env.app.provenance import invocation_record
    from prune_env.app.results import latency_lines
    from prune_env.latency.budget import LatencyCost
    from prune_env.problem import PruningProblem
    from prune_env.settings import ProblemSettings

    torch.set_num_threads(grid["threads"])
    for setting in settings:
        results = setting_results(out, setting, allow_mixed)
        if setting["metric"] != "latency" or results is None:
            continue
        path = out / setting["name"] / (GUARDED if guard else REMEASURED)
        done = loads_strict(path.read_bytes()) if path.exists() else {"runs": []}
        measured = {(r["agent"], r["seed"]) for r in done["runs"]}
        earlier = sorted({int(r.get("rounds", 1)) for r in done["runs"]} - {rounds})
        if earlier:
            raise InvalidSettingError(
                f"{path} holds measurements of {earlier[0]} round(s) each, not {rounds}: pass --rounds "
                f"{earlier[0]} to complete it, or move it aside to measure {rounds}"
            )
        todo = [r for r in results.runs if (r["agent"], r["seed"]) not in measured]
        if not todo:
            continue
        _check_same_machine(results.records(), invocation_record(), setting["name"])
        unscored = {k: v for k, v in grid["problem"].items() if k not in ("proxy", "proxy_steps")}
        problem = PruningProblem(
            setting["model"],
            grid["dataset"],
            ProblemSettings.from_kwargs(
                {
                    **unscored,
                    "proxy": "recalibration",
                    "target_latency": float(setting["target"]),
                    "latency_rounds": rounds,
                    "progress": False,
                }
            ),
        )
        cost = problem.latency
        assert isinstance(cost, LatencyCost), "a latency budget is priced by its table"
        noise = float(cost.model.table.noise)
        for run in tqdm(todo, desc=f"remeasure {setting['name']}", disable=not progress):
            keep = np.array([int(k) for k in str(run["keep"]).split()], dtype=np.int64)
            predicted = float(cost.predict(keep))
            if not math.isclose(predicted, float(run["latency_predicted_ms"]), rel_tol=1e-6):
                raise InvalidSettingError(
                    f"{setting['name']}: the latency table here predicts {predicted:.4g} ms for the final model "
                    f"of {run['agent']} seed {run['seed']}, the run's table {run['latency_predicted_ms']:.4g} ms: "
                    "the table was measured anew (another cache), so measuring now would not check what the "
                    "run's table promised. Remeasure with the cache the runs used."
                )
            before = load_average()
            if guard:
                fit = problem.fit_latency(keep)
                check, fields = fit.check, fit.fields()
                fields["guarded_keep"] = " ".join(str(int(k)) for k in fit.keep)
                fields["guarded_latency_ratio"] = float(cost.predict(fit.keep)) / cost.full_ms
            else:
                check = problem.check_latency(keep, problem.build(keep))  # the median of `rounds`
                fields = dict(check.fields())
            names = ("agent", "model", "dataset", "target", "seed", "metric", "keep", "latency_ratio")
            done["runs"].append(
                {
                    **{k: run[k] for k in names},
                    **{k: int(v) if isinstance(v, bool) else v for k, v in fields.items()},
                    "rounds": rounds,
                    "round_ratios": list(check.round_ratios) or [check.measured_ratio],
                    "latency_protocol_noise": noise,
                    "load_before": before,
                    "load_after": load_average(),
                }
            )
            write_results(path, done)
        print("\n".join(latency_lines(done["runs"])))


def _check_same_machine(records: Sequence[Mapping[str, Any]], here: Mapping[str, Any], name: str) -> None:
    """The runs' final models are measured again on the CPU and torch they were measured with, or not at
    all: another machine's milliseconds do not check this machine's table."""
    for record in records:
        made = (record.get("hardware", {}).get("cpu_model"), record.get("versions", {}).get("torch"))
        now = (here["hardware"]["cpu_model"], here["versions"]["torch"])
        if made != now:
            raise InvalidSettingError(
                f"{name}: runs in {record.get('directory', '?')} were measured on {made[0]} with torch "
                f"{made[1]}; this is {now[0]} with torch {now[1]}. Remeasure on the machine that ran them."
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path, help="a grid file (benchmarks/grids/*.json)")
    parser.add_argument("--out", type=Path, required=True, help="the grid's results directory")
    parser.add_argument("--settings", nargs="+", help="run only these settings of the file (by name)")
    parser.add_argument("--agents", nargs="+", help="run only these agents of the file")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these seeds of the file")
    parser.add_argument("--report", action="store_true", help="print the tables and draw the plots")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the latency settings' final models again, alone on the machine, after the runs",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="report runs of several code revisions or agent settings together (the table says so)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --remeasure: measure each final model (and the unpruned one after it) this many times",
    )
    parser.add_argument(
        "--guard",
        action="store_true",
        help="with --remeasure: apply the latency guard to each final model instead (latency_guarded.json)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        raw = args.grid.read_bytes()
        grid = read_grid(args.grid)
        settings = [
            s
            for s in grid["settings"]
            if s["name"] in _chosen(args.settings, [s["name"] for s in grid["settings"]], "settings")
        ]
        if args.report and args.remeasure:
            raise InvalidSettingError(
                "--report and --remeasure are two steps: run --remeasure, then --report"
            )
        if args.rounds < 1 or (args.rounds != 1 and not args.remeasure):
            raise InvalidSettingError(f"--rounds is a positive count for --remeasure, got {args.rounds}")
        if args.guard and not args.remeasure:
            raise InvalidSettingError("--guard applies the latency guard with --remeasure: add --remeasure")
        if args.report:
            report(args.out, settings, args.allow_mixed)
            return
        if args.remeasure:
            remeasure(
                grid, args.out, settings, args.allow_mixed, not args.no_progress, args.rounds, args.guard
            )
            return
        agents = _chosen(args.agents, list(grid["agents"]), "agents")
        if args.seeds is not None:
            _chosen(args.seeds, sorted({s for a in agents for s in grid["agents"][a]}), "seeds")
        record_grid(args.out, args.grid, raw)
    except (InvalidSettingError, OSError) as exc:
        parser.error(str(exc))
    run_chunk(grid, args.out, settings, agents, args.seeds, progress=not args.no_progress)


if __name__ == "__main__":
    main()
