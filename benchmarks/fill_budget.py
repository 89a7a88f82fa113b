"""How much of the budget one-shot learners spend, with and without ``fill_budget``.

For each agent and seed, a search of ``--evals`` evaluations on resnet20 (digits by default) at 50% MACs, once
with ``fill_budget=False`` and once with it on (the default); prints per run the median MACs ratio of its
evaluations and its best policy's MACs ratio and proxy accuracy, then the medians per setting:

    python benchmarks/fill_budget.py --agents a2c td3 ppo --seeds 0 1 --evals 30
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

import prune_env
from agents import search


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints its tables to standard output and writes no file; committed runs are under benchmarks/results/, each with its command in that directory's README.md.",
    )
    parser.add_argument("--agents", nargs="+", default=["a2c", "td3", "ppo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--evals", type=int, default=30)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--eval-samples", type=int, default=200)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # SB3 and frozen-channel notices are not what is measured
    print(
        f"{'fill':<6} {'agent':<8} {'seed':>4} {'median MACs of evals':>21} {'best MACs':>10} {'best acc':>9}"
    )
    summary = {}
    for fill in (False, True):
        problem = prune_env.PruningProblem(
            "resnet20", args.dataset, progress=False, fill_budget=fill, eval_samples=args.eval_samples,
            target_macs=args.target,
        )  # fmt: skip
        rows = []
        for agent in args.agents:
            for seed in args.seeds:
                result = search(agent, problem, args.evals, seed=seed)
                spent = float(np.median([e.macs_ratio for e in result.history]))
                best = result.best_outcome
                rows.append((spent, best.macs_ratio, best.accuracy))
                print(f"{fill!s:<6} {agent:<8} {seed:>4} {spent:>21.3f} {best.macs_ratio:>10.3f} {best.accuracy:>9.3f}",
                      flush=True)  # fmt: skip
        summary[fill] = np.median(np.array(rows), axis=0)
    for fill, (spent, best, acc) in summary.items():
        print(f"fill_budget={fill}: median over runs — evaluations' MACs ratio {spent:.3f}, best policy's "
              f"{best:.3f}, best proxy accuracy {acc:.3f} (target {args.target:g})")  # fmt: skip


if __name__ == "__main__":
    main()
