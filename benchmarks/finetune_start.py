"""Where should the final fine-tune of a policy start: the model as the proxy scored it, or the pruned base model?

The harness's final fine-tune (:func:`prune_env.app.finetune_recipe.finetune_accuracy`) starts from the model as
the problem's proxy scored it: a supernet proxy's trained sub-network (Stage-wise Pruning's start), or the
pruned model with recalibrated BatchNorm. For the first N policies of a saved ``benchmarks/proxy_fidelity.py``
run (its model, dataset, seed, MACs budget, fine-tune length and training subset), fine-tune each policy
twice, with the same seeds: exactly as the harness does (the reference arm, ``from_proxy``), and with the
same recipe from the pruned base model's weights and BatchNorm statistics (``start="pruned"``,
``from_base``); then compare paired:

    python benchmarks/finetune_start.py --truth-from benchmarks/results/proxy_fidelity_fashion_25_part1.json \\
        --policies 10 --proxy supernet --threads 1 --out run.json
    python benchmarks/finetune_start.py --report run.json

``--proxy`` is the problem's proxy (``supernet``, ``pruningnet``, ``recalibration`` or ``distillation``),
trained as a search trains it (and cached). Fine-tune seeds are 0 to N-1, the harness's run seeds. Files
written before both arms were fine-tuned here (their base arm was the saved ground truth's own fine-tune)
are reported only with each other. ``--out`` is rewritten after every policy, with the revision, versions,
hardware and command that made it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from proxy_fidelity import MAX_RATIO, load_rows
from scipy.stats import kendalltau, ttest_rel

from prune_env import PruningProblem
from prune_env.app.finetune_recipe import FINETUNE_RECIPE, finetune_accuracy
from prune_env.app.measure import write_results
from prune_env.settings import ProblemSettings


def start_problem(saved: dict, proxy: str) -> PruningProblem:
    """The harness's problem for a saved proxy_fidelity.py run's policies, scored by ``proxy``."""
    settings = ProblemSettings(
        target_macs=saved["budget"],
        proxy=proxy,
        max_ratio=MAX_RATIO,
        eval_samples=saved["eval_samples"],
        seed=saved["seed"],
        progress=False,
    )
    return PruningProblem(saved["model"], saved["dataset"], settings)


def compare_starts(
    problem: PruningProblem, keep: np.ndarray, epochs: int, samples: int | None, seeds: Iterable[int]
) -> dict[str, list[float]]:
    """Test accuracy per seed after the harness's fine-tune (``from_proxy``: exactly
    :func:`finetune_accuracy`) and after the same fine-tune from the pruned base model (``from_base``)."""
    seeds = list(seeds)
    return {
        "from_proxy": [finetune_accuracy(problem, keep, epochs, samples, s)[1] for s in seeds],
        "from_base": [finetune_accuracy(problem, keep, epochs, samples, s, start="pruned")[1] for s in seeds],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--truth-from", nargs="+", metavar="JSON", help="a proxy_fidelity.py --out file")
    parser.add_argument("--policies", type=int, default=10, help="the first N policies of the saved run")
    parser.add_argument("--skip", type=int, default=0, help="start after the first K of them (split a run)")
    parser.add_argument("--proxy", default="supernet", help="the problem's proxy: the harness's start")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="fine-tune seeds 0 to N-1 (default: as many as the saved run has)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", default=None, help="write the rows here as each policy finishes (default: only print them)"
    )
    parser.add_argument("--report", nargs="+", metavar="JSON", help="summarise earlier --out files together")
    args = parser.parse_args(argv)
    if args.report:
        runs = [json.loads(Path(p).read_text()) for p in args.report]
        if len({run.get("recipe") for run in runs}) > 1:
            parser.error("these files mix the earlier recipe with the harness's: report them separately")
        summarise([row for run in runs for row in run["rows"]], runs[0]["args"]["proxy"])
        return
    if not args.truth_from:
        parser.error("--truth-from is required (or --report)")
    if args.threads:
        torch.set_num_threads(args.threads)
    saved, known = load_rows(args.truth_from)
    problem = start_problem(saved, args.proxy)
    seeds = range(args.seeds or len(known[min(known)]["truth_seeds"]))
    rows = []
    for i in sorted(known)[args.skip : args.policies]:
        keep = problem.unprojected_keep(known[i]["ratios"])  # the saved policy, not projected again
        arms = compare_starts(
            problem, keep, saved["finetune_epochs"], saved["finetune_samples"] or None, seeds
        )
        rows.append({"policy": i, **arms, "proxy_accuracy": problem.proxy_result(keep).accuracy})
        print(
            f"policy {i}: from {args.proxy} {np.mean(arms['from_proxy']):.4f}, "
            f"from base {np.mean(arms['from_base']):.4f}",
            flush=True,
        )
        if args.out:
            write_results(args.out, {"args": vars(args), "recipe": FINETUNE_RECIPE, "rows": rows})
    summarise(rows, args.proxy)


def summarise(rows: list[dict], proxy: str) -> None:
    """Paired start-point comparison, and the proxy's ranking of both fine-tunes (rows that recorded it)."""
    a = np.array([np.mean(r["from_proxy"]) for r in rows])
    b = np.array([np.mean(r["from_base"]) for r in rows])
    diff = a - b
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    seeds = min(len(r["from_proxy"]) for r in rows)
    print(
        f"\n{len(rows)} policies, {seeds} seed(s): from {proxy} {a.mean():.4f}, from base {b.mean():.4f}; "
        f"paired difference {diff.mean():+.4f} +- {half:.4f} (95% CI), p={ttest_rel(a, b).pvalue:.3f}; "
        f"{proxy} start better on {(diff > 0).sum()}/{len(diff)}; median difference {np.median(diff):+.4f}"
    )
    # Which truth does the proxy rank: the fine-tune a run with this proxy makes (from its weights), or
    # the one from the base model's?
    scored = np.array(["proxy_accuracy" in r for r in rows])
    score = np.array([r.get("proxy_accuracy", np.nan) for r in rows])[scored]
    print(
        f"Kendall tau of the {proxy} proxy's accuracy ({scored.sum()} policies): against fine-tunes from its "
        f"weights {kendalltau(score, a[scored]).statistic:.3f}, from the base model's "
        f"{kendalltau(score, b[scored]).statistic:.3f}"
    )


if __name__ == "__main__":
    main()
