"""Where should the final fine-tune of a supernet-scored policy start: the supernet's weights or the base model's?

Stage-wise Pruning fine-tunes the chosen sub-network from the supernet's shared weights; the rest of
prune_env fine-tunes the pruned base model. For the first N policies of a saved
``benchmarks/proxy_fidelity.py`` ground truth (whose fine-tunes started from the pruned base model), fine-tune
the same policies from the trained proxy's sub-network with the same recipe and seeds, and compare paired:

    python benchmarks/finetune_start.py --truth-from benchmarks/results/proxy_fidelity_fashion_25_part1.json \\
        --policies 10 --proxy supernet --threads 1 --out run.json

The proxy is the one proxy_fidelity.py trains for these policies (same variant name, loaded from the cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from proxy_fidelity import load_rows, parse_trained, random_policy, trained_proxy
from scipy.stats import kendalltau, ttest_rel

import prune_env
from prune_env.data import load
from prune_env.train import finetune, train_base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--truth-from", nargs="+", metavar="JSON")
    parser.add_argument("--policies", type=int, default=10, help="the first N policies of the ground truth")
    parser.add_argument("--skip", type=int, default=0, help="start after the first K of them (split a run)")
    parser.add_argument("--proxy", default="supernet", help="a trained variant of proxy_fidelity.py")
    parser.add_argument("--seeds", type=int, default=None, help="the first N fine-tune seeds of the truth")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", nargs="+", metavar="JSON", help="summarise earlier --out files together")
    args = parser.parse_args(argv)
    if args.report:
        runs = [json.loads(Path(p).read_text()) for p in args.report]
        summarise([row for run in runs for row in run["rows"]], runs[0]["args"]["proxy"])
        return
    if not args.truth_from:
        parser.error("--truth-from is required (or --report)")
    if args.threads:
        torch.set_num_threads(args.threads)
    saved, known = load_rows(args.truth_from)
    splits = load(saved["dataset"], seed=saved["seed"])
    base, _ = train_base(saved["model"], splits, seed=saved["seed"], progress=False)
    tune_splits = splits.with_training_subset(saved["finetune_samples"] or None, saved["seed"])
    graph = prune_env.build_graph(base, splits.example_inputs())
    rng = np.random.default_rng(saved["seed"] if saved.get("policy_seed") is None else saved["policy_seed"])
    policies = [random_policy(graph, saved["budget"] * graph.macs(0.0), rng) for _ in range(max(known) + 1)]
    proxy = trained_proxy(
        parse_trained(args.proxy, saved["eval_samples"]), base, graph, splits, saved["seed"]
    )
    seeds = known[0]["truth_seeds"][: args.seeds]
    rows = []
    for i in sorted(known)[args.skip : args.policies]:
        if not np.allclose(known[i]["ratios"], policies[i], atol=1e-4):
            raise SystemExit(f"policy {i} differs from the saved one: not the same base model or policies")
        keep = graph.keep_counts(policies[i])
        accuracies = []
        for k in seeds:
            start = proxy.prepare_policy(keep, lambda: None)
            _, metrics = finetune(
                start,
                base,
                tune_splits,
                epochs=saved["finetune_epochs"],
                seed=saved["seed"] + k,
                progress=False,
            )
            accuracies.append(metrics["test_accuracy"])
        from_base = known[i]["finetuned_test_accuracy_per_seed"][: len(seeds)]
        score = proxy.evaluate_policy(keep, lambda: None).accuracy
        rows.append({"policy": i, "from_proxy": accuracies, "from_base": from_base, "proxy_accuracy": score})
        print(
            f"policy {i}: from {args.proxy} {np.mean(accuracies):.4f}, from base {np.mean(from_base):.4f}",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
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
