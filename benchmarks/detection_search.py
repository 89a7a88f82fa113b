"""A detector pruned by a search that scores with the user's own metric (mAP), beside the simple baselines.

    python benchmarks/detection_search.py [--train 800] [--val 200] [--test 200] [--epochs 15]
        [--target 0.5] [--evals 60] [--finetune-epochs 5] [--seeds 0 1 2]
        [--agents uniform global random] [--out benchmarks/results/detection_search.json]

A synthetic detection set (:func:`prune_env.detection.synthetic_shapes`: squares and discs with their
boxes; train, validation and test sets from different seeds) and a tiny FCOS trained on it here. Every agent
searches one :class:`~prune_env.problem.PruningProblem` built without a classification dataset: its proxy
is :class:`~prune_env.metric_proxy.MetricProxy` computing mAP@0.5 on the validation set after BatchNorm
recalibration on training images. Each agent's best policy is then fine-tuned on the training set (the same
recipe and seed for every agent) and scored on validation and test. The test set is never seen by the
search. Results go to ``--out`` (JSON: one row per agent and seed, and the provenance); the table printed
gives each agent's mAP and its paired difference by seed from the best non-learned baseline (uniform or
global, by validation mAP) with a 95% Student-t interval; ``--report FILE`` prints it again from a file.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import agents
from prune_env import MetricProxy, PruningProblem
from prune_env.app.measure import write_results
from prune_env.app.paired import paired_difference
from prune_env.detection import mean_average_precision, synthetic_shapes, tiny_detector, train_detector


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=800, help="training images")
    parser.add_argument("--val", type=int, default=200, help="validation images (the search's metric)")
    parser.add_argument("--test", type=int, default=200, help="test images (scored after the search only)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the base detector's training")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--evals", type=int, default=60, help="metric evaluations per search")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="epochs of each result's fine-tune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--agents", nargs="+", default=["uniform", "global", "random"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/detection_search.json"), help="where results go"
    )
    parser.add_argument(
        "--report", type=Path, help="print the table of a results file written earlier, and stop"
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        print_table(json.loads(args.report.read_text())["runs"])
        return
    torch.set_num_threads(args.threads)

    train = synthetic_shapes(args.train, seed=0)
    val = synthetic_shapes(args.val, seed=1)
    test = synthetic_shapes(args.test, seed=2)
    start = time.perf_counter()
    base = train_detector(tiny_detector(), train, epochs=args.epochs, seed=0)
    base_scores = {"val": mean_average_precision(base, val), "test": mean_average_precision(base, test)}
    print(f"base detector: val mAP {base_scores['val']:.4f}, test {base_scores['test']:.4f} "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip

    recalibration = [[image for image, _ in train[i : i + 16]] for i in range(0, 128, 16)]
    proxy = MetricProxy(
        functools.partial(mean_average_precision, samples=val), recalibration_batches=recalibration
    )
    problem = PruningProblem(
        base, None, proxy=proxy, example_inputs=([val[0][0]],), target_macs=args.target, progress=False
    )
    rows = []
    for agent in args.agents:
        for seed in args.seeds:
            began = time.perf_counter()
            result = agents.search(agent, problem, budget_evals=args.evals, seed=seed)
            scored = problem.scored_model(result.best_keep)
            tuned = train_detector(
                scored, train, epochs=args.finetune_epochs, lr=0.005, seed=seed, progress=False
            )
            row = {
                "agent": agent,
                "seed": seed,
                "evals_used": len(result.history),
                "macs_ratio": result.best_outcome.macs_ratio,
                "search_val_map": result.best_outcome.accuracy,
                "val_map": mean_average_precision(tuned, val),
                "test_map": mean_average_precision(tuned, test),
                "keep": result.best_keep.tolist(),
                "seconds": time.perf_counter() - began,
            }
            rows.append(row)
            print(f"{agent:>9} seed {seed}: MACs {row['macs_ratio']:.3f}, searched val mAP "
                  f"{row['search_val_map']:.4f}, fine-tuned val {row['val_map']:.4f} test {row['test_map']:.4f}")  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results(args.out, {"settings": settings, "base": base_scores, "runs": rows})
    print_table(rows)
    print(f"results: {args.out}")


def print_table(rows: list[dict[str, Any]]) -> None:
    """Each agent's mean validation mAP before fine-tuning (the search's score), its fine-tuned mAP, and its paired difference from the best non-learned baseline's
    (uniform and global: the higher mean validation mAP) by seed, with a 95% Student-t interval."""
    agents_run = list(dict.fromkeys(r["agent"] for r in rows))
    maps = {
        (agent, split): {r["seed"]: r[f"{split}_map"] for r in rows if r["agent"] == agent}
        for agent in agents_run
        for split in ("val", "test")
    }
    baselines = [a for a in ("uniform", "global") if a in agents_run]
    best = max(baselines, key=lambda a: np.mean(list(maps[a, "val"].values()))) if baselines else None
    print(
        f"\n{'agent':>9} {'MACs':>6} {'searched':>8} {'val mAP':>8} {'test mAP':>8}   vs {best or '-'} "
        "(val, test; 95% CI)"
    )
    for agent in agents_run:
        mine = [r for r in rows if r["agent"] == agent]
        macs, searched = (
            np.mean([r["macs_ratio"] for r in mine]),
            np.mean([r["search_val_map"] for r in mine]),
        )
        line = f"{agent:>9} {macs:6.3f} {searched:8.4f} "
        line += " ".join(f"{np.mean(list(maps[agent, split].values())):8.4f}" for split in ("val", "test"))
        if best is not None and agent != best:
            for split in ("val", "test"):
                d = paired_difference(maps[agent, split], maps[best, split])
                line += f"   {d['mean_difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
        print(line)


if __name__ == "__main__":
    main()
