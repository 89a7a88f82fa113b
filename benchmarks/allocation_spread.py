"""Where does the allocation of a budget matter, and how long must the final fine-tune be?

Before agents are compared, the setting must be one where a better allocation *can* win. For each model and
budget: draw N random policies (as the ``random`` agent does: ratios uniform in [0, max_ratio], projected
onto the budget), fine-tune each briefly and keep the best by **validation** accuracy; then fine-tune
uniform pruning and that best random policy for several lengths and report test accuracy. A large
spread (best random - uniform) marks a setting that can tell methods apart; the lengths show where uniform
reaches its plateau (a 1-epoch fine-tune rewards fast recoverers, not good architectures).

    python benchmarks/allocation_spread.py --models vgg11_quarter resnet20 --budgets 0.1 0.2 0.3 \\
        --random 20 --lengths 1 3 6 --finetune-samples 20000 --threads 1 --out spread.json
    python benchmarks/allocation_spread.py --report spread.json

``--metric params`` budgets parameters instead of MACs. The two differ in what uniform pruning wastes: in
a ResNet every stage costs about the same MACs (channels double as resolution halves), so a uniform ratio
is close to an even MACs split, while parameters sit mostly in the late, wide layers, where uniform pruning
removes as much of the cheap early layers as of the expensive late ones.

Every fine-tune is the harness's (:func:`prune_env.app.finetune_recipe.finetune_accuracy`: KD from the base
model, starting from the pruned model as the proxy scored it, on one fixed training subset of
``--finetune-samples``), with the same seed. Every finished fine-tune is written to ``--out`` at once, and a
rerun with the same file skips what it holds (an interrupted setting goes on from its last finished
fine-tune); a file written before the scripts shared that recipe is refused rather than extended. The file
records the revision, versions, hardware and command of every invocation that wrote it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prune_env import PruningProblem
from prune_env.app.finetune_recipe import finetune_accuracy, resumable_results
from prune_env.app.measure import write_results


def tuned(
    problem: PruningProblem, keep: np.ndarray, epochs: int, samples: int | None, seed: int
) -> dict[str, Any]:
    """One fine-tune of ``keep``: the harness's recipe, timed."""
    start = time.perf_counter()
    val, test = finetune_accuracy(problem, keep, epochs, samples, seed)
    return {
        "epochs": epochs,
        "val_accuracy": val,
        "test_accuracy": test,
        "seconds": time.perf_counter() - start,
    }


def cost_fraction(problem: PruningProblem, keep: np.ndarray, metric: str) -> float:
    """``keep``'s MACs or parameters as a fraction of the base model's."""
    graph = problem.graph
    return getattr(graph.costs, metric)(keep) / getattr(graph, f"base_{metric}")


def metric_of(row: dict[str, Any]) -> str:
    """The metric a saved setting budgets (rows written before it was recorded are MACs budgets)."""
    return str(row.get("metric", "macs"))


def measure(
    args: argparse.Namespace, model: str, budget: float, done: dict[str, Any], checkpoint: Callable[[], None]
) -> dict[str, Any]:
    """One (model, budget) setting. ``done`` holds the fine-tunes finished so far (``"screen"``: the
    screening runs in order; ``"lengths"``) and ``checkpoint()`` persists it after each new one, so an
    interrupted setting resumes where it stopped."""
    target: dict[str, Any] = {f"target_{args.metric}": budget}
    problem = PruningProblem(model, args.dataset, seed=args.seed, progress=False, **target)
    rng = np.random.default_rng(args.seed)
    policies = [
        problem.keep_for(rng.uniform(0.0, problem.max_ratio, problem.n_groups)) for _ in range(args.random)
    ]
    screened: list[dict[str, Any]] = done.setdefault("screen", [])
    for i in range(len(screened), len(policies)):
        screened.append(tuned(problem, policies[i], args.screen_epochs, args.finetune_samples, args.seed))
        checkpoint()
        print(f"  {model} @{budget}: random {i}: val {screened[-1]['val_accuracy']:.4f}", flush=True)
    best = int(np.argmax([s["val_accuracy"] for s in screened]))
    uniform = problem.uniform_keep()
    lengths: dict[str, dict[str, Any]] = done.setdefault("lengths", {"uniform": {}, "best_random": {}})
    for epochs in args.lengths:
        for name, keep in (("uniform", uniform), ("best_random", policies[best])):
            if str(epochs) in lengths[name]:
                continue
            run = screened[best] if name == "best_random" and epochs == args.screen_epochs else None
            lengths[name][str(epochs)] = run or tuned(problem, keep, epochs, args.finetune_samples, args.seed)
            checkpoint()
        print(
            f"  {model} @{budget}: {epochs} epochs: uniform {lengths['uniform'][str(epochs)]['test_accuracy']:.4f}, "
            f"best random {lengths['best_random'][str(epochs)]['test_accuracy']:.4f}",
            flush=True,
        )
    return {
        "model": model,
        "budget": budget,
        "metric": args.metric,
        "base_metrics": problem.base_metrics,
        **{
            f"{m}_fraction": {
                "uniform": cost_fraction(problem, uniform, m),
                "random": [cost_fraction(problem, k, m) for k in policies],
            }
            for m in ("macs", "params")
        },
        "uniform_keep": uniform.tolist(),
        "random_keep": [k.tolist() for k in policies],
        "screen": screened,
        "best_random": best,
        "lengths": lengths,
    }


def report(paths: list[str]) -> None:
    rows = [row for p in paths for row in json.loads(Path(p).read_text())["rows"]]
    print(
        "| model | budget | fine-tune epochs | uniform test acc | best-of-N random test acc | spread (points) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        for epochs, u in row["lengths"]["uniform"].items():
            b = row["lengths"]["best_random"][epochs]
            print(
                f"| {row['model']} | {row['budget']:.0%} {metric_of(row)} | {epochs} | {u['test_accuracy']:.4f} | "
                f"{b['test_accuracy']:.4f} | {100 * (b['test_accuracy'] - u['test_accuracy']):+.2f} |"
            )
    for row in rows:
        vals = np.array([s["val_accuracy"] for s in row["screen"]])
        print(
            f"{row['model']} @{row['budget']:.0%} {metric_of(row)}: {len(vals)} random policies after "
            f"{row['screen'][0]['epochs']} epoch(s): val {vals.min():.4f}-{vals.max():.4f} "
            f"(median {np.median(vals):.4f}); uniform at that length: "
            f"val {row['lengths']['uniform'][str(row['screen'][0]['epochs'])]['val_accuracy']:.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--models", nargs="+", default=["vgg11_quarter", "resnet20"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--metric", choices=["macs", "params"], default="macs", help="what the budget limits")
    parser.add_argument("--random", type=int, default=20, help="random policies screened per setting")
    parser.add_argument("--screen-epochs", type=int, default=1)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1, 3, 6], help="final fine-tune epochs")
    parser.add_argument("--finetune-samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="allocation_spread.json")
    parser.add_argument("--report", nargs="+", metavar="JSON")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    saved = resumable_results(out, vars(args))

    def write() -> None:
        write_results(out, saved)

    finished = {(r["model"], r["budget"], metric_of(r)) for r in saved["rows"]}
    for model in args.models:
        for budget in args.budgets:
            setting = (model, budget, args.metric)
            if setting in finished:
                continue
            # A setting interrupted part-way keeps its finished fine-tunes under "unfinished".
            partial = saved.get("unfinished") or {}
            if (partial.get("model"), partial.get("budget"), metric_of(partial)) != setting:
                partial = {"model": model, "budget": budget, "metric": args.metric}
            saved["unfinished"] = partial
            saved["rows"].append(measure(args, model, budget, partial, write))
            del saved["unfinished"]
            write()
    report([str(out)])


if __name__ == "__main__":
    main()
