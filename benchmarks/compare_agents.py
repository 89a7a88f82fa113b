"""All search agents at an equal number of proxy evaluations, then an identical KD fine-tune.

For each dataset and MACs target, every agent searches the same :class:`PruningProblem` (same base model,
ranking, projection and proxy on validation data) with the same evaluation budget and several seeds. The
best policy found gets the harness's final fine-tune (:func:`prune_env.app.finetune_recipe.finetune_accuracy`:
distillation from the unpruned model, starting from the pruned model as the proxy scored it, on one fixed
training subset); only then is the test split read.

    python benchmarks/compare_agents.py --datasets digits --targets 0.25 0.5 --seeds 0 1 2 --evals 40 \\
        --finetune-epochs 3 --csv agents.csv
    python benchmarks/compare_agents.py --datasets fashion-mnist --targets 0.25 0.5 --seeds 0 1 2 --evals 30 \\
        --finetune-epochs 1 --finetune-samples 8000 --csv agents_fashion.csv

Rows are appended to the CSV as they finish, so an interrupted run keeps its results. The problem memoises
proxy results, and is shared by all agents of a (dataset, target): seconds are therefore lower for agents
that revisit policies others already scored (the evaluation *count* is unaffected).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from agents import available, search
from prune_env.app.finetune_recipe import finetune_accuracy
from prune_env.data import load
from prune_env.problem import PruningProblem
from prune_env.train import train_base

FIELDS = [
    "dataset",
    "model",
    "target",
    "agent",
    "seed",
    "evals",
    "proxy_finetune_steps",
    "proxy_accuracy",
    "macs_ratio",
    "finetuned_val_accuracy",
    "finetuned_test_accuracy",
    "search_seconds",
    "finetune_seconds",
    "finetune_epochs",
    "finetune_samples",
    "best_ratios",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["digits"])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--evals", type=int, default=40, help="proxy evaluations per search")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument(
        "--finetune-samples",
        type=int,
        default=None,
        help="fine-tune on a fixed, seeded subset of train this size (the same subset for every agent)",
    )
    parser.add_argument("--agents", nargs="+", default=available(), choices=available())
    parser.add_argument("--eval-samples", type=int, default=1000, help="validation samples of the proxy")
    parser.add_argument("--bn-recalib-batches", type=int, default=8)
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="KD steps inside the proxy (then BN is recalibrated again); 0: recalibration only",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--csv",
        type=Path,
        default=Path("agents_benchmark.csv"),
        help="append one row per search here as it finishes",
    )
    parser.add_argument(
        "--report", nargs="+", type=Path, metavar="CSV", help="print the summary of earlier runs' CSV files"
    )
    return parser.parse_args(argv)


def final_scores(
    problem: PruningProblem, keep: np.ndarray, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    """The fine-tuned columns of one run's row: the harness's final fine-tune of ``keep``, timed."""
    start = time.perf_counter()
    val, test = finetune_accuracy(problem, keep, args.finetune_epochs, args.finetune_samples or None, seed)
    return {
        "finetuned_val_accuracy": val,
        "finetuned_test_accuracy": test,
        "finetune_seconds": time.perf_counter() - start,
    }


def summarise(rows: list[dict[str, object]]) -> str:
    """Mean ± std over seeds per (dataset, target, proxy KD steps, agent)."""
    groups: dict[tuple[str, float, int, str], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        kd = int(row.get("proxy_finetune_steps") or 0)
        groups[(str(row["dataset"]), float(row["target"]), kd, str(row["agent"]))].append(row)

    def ms(values: list[float]) -> str:
        return f"{100 * np.mean(values):5.1f} ± {100 * np.std(values):4.1f}"

    lines = [
        f"{'dataset':<14} {'MACs':>5} {'KD':>3} {'agent':<10} {'n':>2} {'proxy acc %':>13} {'fine-tuned test %':>17} "
        f"{'MACs used':>9} {'search s':>8}"
    ]
    for (dataset, target, kd, agent), rs in sorted(groups.items()):
        lines.append(
            f"{dataset:<14} {target:>5.2f} {kd:>3} {agent:<10} {len(rs):>2} "
            f"{ms([float(r['proxy_accuracy']) for r in rs]):>13} "
            f"{ms([float(r['finetuned_test_accuracy']) for r in rs]):>17} "
            f"{np.mean([float(r['macs_ratio']) for r in rs]):>9.3f} "
            f"{np.mean([float(r['search_seconds']) for r in rs]):>8.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(summarise([row for path in args.report for row in csv.DictReader(path.open())]))
        return 0
    torch.set_num_threads(args.threads)
    new_file = not args.csv.exists()
    rows: list[dict[str, object]] = []
    with args.csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for dataset in args.datasets:
            splits = load(dataset, seed=0)
            base, metrics = train_base(args.model, splits, seed=0, progress=False)
            print(f"{args.model} on {dataset}: base test accuracy {metrics['test_accuracy']:.4f}", flush=True)
            for target in args.targets:
                problem = PruningProblem(
                    base,
                    splits,
                    target_macs=target,
                    eval_samples=args.eval_samples,
                    bn_recalib_batches=args.bn_recalib_batches,
                    finetune_steps=args.finetune_steps,
                    progress=False,
                )
                # Seeds outermost: an interrupted run still has every agent at the same number of seeds.
                for seed in args.seeds:
                    for agent in args.agents:
                        result = search(agent, problem, args.evals, seed=seed)
                        tuned = final_scores(problem, result.best_keep, args, seed)
                        row: dict[str, object] = {
                            "dataset": dataset,
                            "model": args.model,
                            "target": target,
                            "agent": agent,
                            "seed": seed,
                            "evals": len(result.history),
                            "proxy_finetune_steps": args.finetune_steps,
                            "proxy_accuracy": result.best_outcome.accuracy,
                            "macs_ratio": result.best_outcome.macs_ratio,
                            **tuned,
                            "search_seconds": result.seconds,
                            "finetune_epochs": args.finetune_epochs,
                            "finetune_samples": args.finetune_samples or len(splits.train),
                            "best_ratios": " ".join(f"{r:.3f}" for r in result.best_ratios),
                        }
                        writer.writerow(row)
                        handle.flush()
                        rows.append(row)
                        print(
                            f"[{time.strftime('%H:%M:%S')}] {dataset} {target} seed {seed} {agent:<10} "
                            f"proxy {row['proxy_accuracy']:.4f} tuned {tuned['finetuned_test_accuracy']:.4f} "
                            f"macs {row['macs_ratio']:.3f} ({result.seconds:.1f}s)",
                            flush=True,
                        )
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
