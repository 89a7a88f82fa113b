"""One budget-conditioned agent for many targets, against one search per target.

A budget-conditioned learner (CACP-style: the target is in its observation) is trained once over
``--range`` with ``--range-evals`` proxy evaluations, then prunes for every ``--targets`` value with no
further evaluation. It is compared, target by target, with the same agent searched separately at each
target (``--evals`` each) and with uniform pruning. Every policy gets the harness's final fine-tune
(:func:`prune_env.app.finetune_recipe.finetune_accuracy`: one recipe, one fixed training subset). Targets are
fractions of the base model's ``--metric`` (MACs by default, or parameters).

    python benchmarks/budget_conditioned.py --model resnet20 --dataset fashion-mnist --agent ppo \\
        --targets 0.15 0.25 0.35 --evals 300 --range-evals 300 --seeds 0 --proxy supernet \\
        --max-ratio 0.9 --finetune-epochs 6 --finetune-samples 20000 --threads 1 --out runs/conditioned
    python benchmarks/budget_conditioned.py --report runs/conditioned

Rows are appended to ``OUT/rows.json`` as they finish and the trained policy is saved under
``OUT/policy-seedN``; the same command resumes (finished rows are skipped, a saved policy is reloaded).
``OUT/settings.json`` holds the settings and the revision, versions, hardware and command of every
invocation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import search
from agents.policies import Policy, load_policy
from prune_env import PruningProblem
from prune_env.app.finetune_recipe import finetune_accuracy
from prune_env.app.measure import PROVENANCE, write_json, write_results
from prune_env.settings import ProblemSettings

SETTINGS_FILE = "settings.json"
ROWS_FILE = "rows.json"


def row_for(
    method: str,
    problem: PruningProblem,
    keep: np.ndarray,
    args: argparse.Namespace,
    seed: int,
    evals: int,
    start: float,
) -> dict[str, Any]:
    val, test = finetune_accuracy(problem, keep, args.finetune_epochs, args.finetune_samples, seed)
    return {
        "method": method,
        "target": problem.target,
        "seed": seed,
        "evals": evals,
        "macs_ratio": problem.graph.costs.macs(keep) / problem.graph.base_macs,
        "params_ratio": problem.graph.costs.params(keep) / problem.graph.base_params,
        "val_accuracy": val,
        "test_accuracy": test,
        "seconds": time.perf_counter() - start,
        "keep": [int(k) for k in keep],
    }


def trained_policy(
    args: argparse.Namespace, problem: PruningProblem, seed: int, out: Path
) -> tuple[Policy, float]:
    """The budget-conditioned policy of ``seed``: reloaded if saved, else trained once and saved."""
    directory = out / f"policy-seed{seed}"
    if directory.exists():
        return load_policy(directory), 0.0
    start = time.perf_counter()
    result = search(
        args.agent, problem, args.range_evals, seed=seed, budget_range=(args.range[0], args.range[1])
    )
    assert result.policy is not None  # SB3 learners always leave their trained policy
    result.policy.save(directory)
    return result.policy, time.perf_counter() - start


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report", "threads")}
    saved_settings = out / SETTINGS_FILE
    # The settings file is the directory's record: it names every invocation that added rows.json's rows.
    earlier = json.loads(saved_settings.read_text()) if saved_settings.exists() else None
    records = earlier.pop(PROVENANCE, []) if earlier is not None else []
    if earlier is not None and with_metric(earlier) != settings:
        raise SystemExit(f"{out} holds a run with other settings ({saved_settings}): use another --out")
    write_results(saved_settings, {**settings, PROVENANCE: records})
    rows_path = out / ROWS_FILE
    rows: list[dict[str, Any]] = json.loads(rows_path.read_text()) if rows_path.exists() else []

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        write_json(rows_path, rows)
        print(
            f"{row['method']:>24} @{row['target']:.2f} seed {row['seed']}: test {row['test_accuracy']:.4f} "
            f"({args.metric} {row[f'{args.metric}_ratio']:.3f}, {row['evals']} evals, {row['seconds']:.0f} s)",
            flush=True,
        )

    def done(method: str, target: float, seed: int) -> bool:
        return any((r["method"], r["target"], r["seed"]) == (method, target, seed) for r in rows)

    problems = {
        t: PruningProblem(
            args.model,
            args.dataset,
            ProblemSettings(
                **{f"target_{args.metric}": t}, proxy=args.proxy, max_ratio=args.max_ratio, progress=False
            ),
        )
        for t in args.targets
    }
    middle = problems[args.targets[len(args.targets) // 2]]
    conditioned = f"{args.agent} over range"
    per_target = f"{args.agent} per target"
    for seed in args.seeds:
        if not all(done(conditioned, t, seed) for t in args.targets):
            policy, seconds = trained_policy(args, middle, seed, out)
            for t, problem in problems.items():
                if not done(conditioned, t, seed):
                    start = time.perf_counter() - seconds / len(args.targets)
                    save(row_for(conditioned, problem, policy.keep_for(problem, t), args, seed, 0, start))
        for t, problem in problems.items():
            if not done("uniform", t, seed):
                save(row_for("uniform", problem, problem.uniform_keep(), args, seed, 0, time.perf_counter()))
            if not done(per_target, t, seed):
                start = time.perf_counter()
                result = search(args.agent, problem, args.evals, seed=seed)
                save(row_for(per_target, problem, result.best_keep, args, seed, args.evals, start))
    report(out)


def with_metric(settings: dict[str, Any]) -> dict[str, Any]:
    """Saved settings with their metric (runs saved before the metric was an option budgeted MACs)."""
    return {"metric": "macs", **settings}


def report(out: Path) -> None:
    """Test accuracy per target (mean over seeds) and the evaluations each method spent in all."""
    settings = with_metric(json.loads((out / SETTINGS_FILE).read_text()))
    unit = "MACs" if settings["metric"] == "macs" else "params"
    rows = json.loads((out / ROWS_FILE).read_text())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    total = {
        "uniform": 0,
        f"{settings['agent']} over range": settings["range_evals"],
        f"{settings['agent']} per target": settings["evals"] * len(settings["targets"]),
    }
    print(
        "| method | " + " | ".join(f"test acc @{t:.0%} {unit}" for t in targets) + " | mean | evaluations |"
    )
    print("|---|" + "---|" * (len(targets) + 2))
    for method in methods:
        cells, means = [], []
        for t in targets:
            accs = [r["test_accuracy"] for r in rows if (r["method"], r["target"]) == (method, t)]
            means.append(float(np.mean(accs)) if accs else float("nan"))
            cells.append(f"{means[-1]:.4f} (n={len(accs)})" if accs else "—")
        print(
            f"| {method} | " + " | ".join(cells) + f" | {np.nanmean(means):.4f} | {total.get(method, '?')} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--agent", default="ppo", help="a budget-conditioned agent (an SB3 learner)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.15, 0.25, 0.35])
    parser.add_argument("--metric", choices=["macs", "params"], default="macs", help="what the targets limit")
    parser.add_argument(
        "--range", nargs=2, type=float, metavar=("LO", "HI"), help="default: the targets' min and max"
    )
    parser.add_argument("--evals", type=int, default=300, help="evaluations of each per-target search")
    parser.add_argument("--range-evals", type=int, default=300, help="evaluations of the one trained policy")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--proxy", default="supernet")
    parser.add_argument("--max-ratio", type=float, default=0.9)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--finetune-samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/budget_conditioned")
    parser.add_argument("--report", metavar="DIR", help="print the table of a finished or partial run")
    args = parser.parse_args(argv)
    if args.report:
        report(Path(args.report))
        return
    args.targets = sorted(args.targets)
    args.range = args.range or [args.targets[0], args.targets[-1]]
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
