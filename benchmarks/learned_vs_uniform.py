"""Do learned pruning distributions beat uniform pruning after a real fine-tune?

Every agent searches the same problem with the same number of proxy evaluations (the supernet proxy by
default: a trained Stage-wise Pruning supernet scores each policy at about the cost of the recalibration
proxy), then its best policy is fine-tuned with one recipe on one fixed training subset and scored on the
test split. The table gives mean ± sample std over seeds of validation and test accuracy and each agent's
paired differences (same seed) on both splits to uniform (does allocation beat no allocation?), to random
search (does learning beat sampling at equal evaluations?) and to the best non-learned baseline of the
setting (the highest mean validation accuracy among uniform, global, knapsack and sensitivity), with 95%
Student-t intervals. Beneath it: the headline (the largest learned-minus-best-baseline test difference)
checked on validation and test after a Holm–Bonferroni correction over every comparison of the table, and
whether each of the project's goals is met. ``paired.csv`` (every comparison with its p-values),
``pareto.png`` and ``curves.png`` are written beside the results.

    python benchmarks/learned_vs_uniform.py --model resnet20 --dataset fashion-mnist --target 0.25 \\
        --agents uniform ppo random --seeds 0 --evals 1000 --proxy supernet --max-ratio 0.9 \\
        --finetune-epochs 6 --finetune-samples 20000 --threads 1 --out runs/learned_vs_uniform
    python benchmarks/learned_vs_uniform.py --report runs/learned_vs_uniform

The grid is ``prune_env.app.benchmark.run``: rows are written as runs finish and the same command (or
one with more agents or seeds) resumes it, so a grid too long for one sitting grows across several. A
directory belongs to one process: to run parts of a grid at the same time, give each its own ``--out`` and
report them together, ``--report DIR1 DIR2`` (the plots and ``paired.csv`` go to the first).

Every directory records the git revision and each agent's full settings; resuming or reporting together
results of other code or other settings is refused unless ``--allow-mixed`` (the table then says so).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prune_env.app import benchmark
from prune_env.app.results import BenchmarkResults
from prune_env.errors import InvalidSettingError

REFERENCES = ("uniform", "random")


def report(results: BenchmarkResults, out: Path) -> None:
    print(results.table(references=REFERENCES))
    print()
    print(results.verdicts(references=REFERENCES))
    results.write_paired(out / "paired.csv", references=REFERENCES)
    results.plot_pareto(out / "pareto.png")
    results.plot_curves(out / "curves.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument(
        "--target", type=float, default=0.25, help="budget, a fraction of the base's --metric"
    )
    parser.add_argument("--metric", choices=["macs", "params"], default="macs", help="what the budget limits")
    parser.add_argument("--agents", nargs="+", default=["uniform", "random", "ppo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--evals", type=int, default=1000)
    parser.add_argument("--proxy", default="supernet")
    parser.add_argument("--max-ratio", type=float, default=0.9)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--finetune-samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/learned_vs_uniform")
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="DIR",
        help="print the table of a grid (or of parts of one run apart) and redraw its plots",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="resume or report results of other code (git revisions) or other agent settings together; "
        "the table names what was mixed",
    )
    args = parser.parse_args(argv)
    if args.report:
        if missing := [d for d in args.report if not (Path(d) / "runs.csv").exists()]:
            parser.error(f"--report: no runs.csv in {', '.join(missing)}; give directories a grid wrote")
        parts = [BenchmarkResults.load(d) for d in args.report]
        try:
            combined = BenchmarkResults.combine(parts, allow_mixed=args.allow_mixed)
        except InvalidSettingError as exc:
            parser.error(f"--report: {exc}")
        report(combined, Path(args.report[0]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = benchmark.run(
        args.agents,
        models=[args.model],
        datasets=[args.dataset],
        targets=[args.target],
        metric=args.metric,
        seeds=args.seeds,
        evals=args.evals,
        out=args.out,
        finetune_epochs=args.finetune_epochs,
        finetune_samples=args.finetune_samples,
        problem_kwargs={"proxy": args.proxy, "max_ratio": args.max_ratio},
        allow_mixed=args.allow_mixed,
    )
    report(results, Path(args.out))


if __name__ == "__main__":
    main()
