"""How well does each reward proxy rank pruning policies, and what does it cost?

For N random pruning policies of resnet20 at one MACs budget, compare each proxy variant (plain
evaluation, BatchNorm recalibration on K batches, recalibration + k knowledge-distillation steps) with
the accuracy after a longer KD fine-tune, by Kendall's tau, and time each variant.

    python benchmarks/proxy_fidelity.py --dataset digits --policies 30 --budget 0.5 --threads 1
    python benchmarks/proxy_fidelity.py --dataset fashion-mnist --policies 30 --budget 0.25 \\
        --finetune-epochs 1 --finetune-samples 20000 --truth-seeds 2 --threads 1 --out run.json
    python benchmarks/proxy_fidelity.py --quick      # a smoke run: 6 policies, short fine-tune

Variants: ``plain``, ``bnK`` (K recalibration batches), ``+kdN`` (N distillation steps), ``+re``
(recalibrate again after them), ``+lrX`` / ``+bB`` (their learning rate / batch size), ``+nS`` (S validation
samples). Trained proxies: ``supernet`` (Stage-wise Pruning) and ``pruningnet`` (MetaPruning), with
``+sN`` (N training steps), ``+lrX``, ``+bnK``, ``+kdN`` (N distillation steps on the scored
sub-network), ``+nS``, ``+mLO-HI`` (random sub-networks drawn in this
MACs band), ``+nostages`` (supernet without stages); a
supernet also reports ``supernet...[stage loss]``, whose loss column is the summed stage-wise distillation
loss. Their one-off training time is printed under the table (trained proxies are cached on disk). The fine-tunes dominate the cost, so runs compose: ``--truth-from run.json`` measures new variants
against a saved ground truth, ``--truth-seed-start 2 --variants none`` adds fine-tune seeds to it,
``--policy-seed`` draws a held-out set of policies, and ``--report`` merges any of these files.

Random policies: a uniform ratio per channel group, all multiplied by one factor found by bisection so
that the pruned model's MACs are within 1% of ``budget x`` the unpruned model's (ratios capped at 0.9).
The ground truth is measured on ``test`` after the fine-tune; the proxies only ever see train and val.
``--out`` is rewritten after every policy, with the revision, versions, hardware and command that made it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

import prune_env
from prune_env.app.measure import write_results
from prune_env.data import Splits, load
from prune_env.importance import get_importance
from prune_env.proxy import ProxyContext, ProxyEvaluator
from prune_env.settings import ProblemSettings
from prune_env.supernet import PruningNetProxy, SupernetConfig, SupernetProxy, TrainedProxy
from prune_env.train import finetune, train_base

MAX_RATIO = 0.9
l1 = get_importance("l1")


def random_policy(
    graph: prune_env.DependencyGraph, target_macs: float, rng: np.random.Generator
) -> np.ndarray:
    raw = rng.uniform(0.0, 1.0, len(graph.groups))
    lo, hi = 0.0, 1.0 / max(raw.min(), 1e-3)  # at `hi` every ratio hits the cap
    for _ in range(50):
        mid = (lo + hi) / 2
        if graph.macs(np.minimum(raw * mid, MAX_RATIO)) > target_macs:
            lo = mid
        else:
            hi = mid
    return np.minimum(raw * hi, MAX_RATIO)


def parse_variants(spec: str, eval_samples: int) -> dict[str, dict[str, Any]]:
    """'plain,bn8,bn8+kd25+re,bn8+kd50+re+lr0.05+b128,bn8+n6000' -> {label: ProxyEvaluator keyword arguments}:
    bnK recalibration batches, kdN distillation steps, re recalibrate after them, lrX their learning rate,
    bB their batch size, nS validation samples."""
    variants = {}
    for item in spec.split(","):
        item = item.strip()
        kwargs: dict[str, Any] = {
            "bn_recalib_batches": 0,
            "finetune_steps": 0,
            "recalibrate_after_finetune": False,
            "eval_samples": eval_samples,
        }
        if item.split("+")[0] in ("supernet", "pruningnet"):
            variants[item] = parse_trained(item, eval_samples)
            continue
        for part in item.split("+"):
            if part.startswith("bn"):
                kwargs["bn_recalib_batches"] = int(part[2:])
            elif part.startswith("kd"):
                kwargs["finetune_steps"] = int(part[2:])
            elif part.startswith("lr"):
                kwargs["finetune_lr"] = float(part[2:])
            elif part.startswith("b"):
                kwargs["finetune_batch_size"] = int(part[1:])
            elif part.startswith("n"):
                kwargs["eval_samples"] = int(part[1:])
            elif part == "re":
                kwargs["recalibrate_after_finetune"] = True
            elif part != "plain":
                raise ValueError(
                    f"bad variant {item!r}: use plain, bnK, bnK+kdN, bnK+kdN+re, +lrX, +bBATCH, +nSAMPLES"
                )
        variants[item] = kwargs
    return variants


def parse_trained(item: str, eval_samples: int) -> dict[str, Any]:
    """'supernet+s2000+lr0.02+bn8+n1000' -> the proxy kind, its SupernetConfig fields and its scoring."""
    kind, *parts = item.split("+")
    spec: dict[str, Any] = {"kind": kind, "config": {}, "bn_recalib_batches": 8, "eval_samples": eval_samples}
    for part in parts:
        if part.startswith("s") and part[1:].isdigit():
            spec["config"]["steps"] = int(part[1:])
        elif part.startswith("lr"):
            spec["config"]["lr"] = float(part[2:])
        elif part.startswith("bn"):
            spec["bn_recalib_batches"] = int(part[2:])
        elif part.startswith("kd"):
            spec["finetune_steps"] = int(part[2:])
        elif part == "nostages":  # before +nSAMPLES, which it also starts like
            spec["config"]["stages"] = ()
        elif part.startswith("n"):
            spec["eval_samples"] = int(part[1:])
        elif part.startswith("m") and "-" in part:  # m0.2-0.3: random sub-networks in this MACs band
            spec["config"]["macs_band"] = tuple(float(v) for v in part[1:].split("-"))
        else:
            raise ValueError(
                f"bad variant {item!r}: use {kind}[+sSTEPS][+lrX][+bnK][+kdN][+nSAMPLES][+mLO-HI][+nostages]"
            )
    return spec


def trained_proxy(
    spec: dict[str, Any], base: torch.nn.Module, graph: prune_env.DependencyGraph, splits: Splits, seed: int
) -> TrainedProxy:
    """A supernet or PruningNet for the benchmark's policies: the base model's L1 rankings (what
    ``prune_env.prune`` keeps), random sub-networks up to the policies' cap of MAX_RATIO."""
    rankings = tuple(
        np.argsort(-np.asarray(l1(g, base), dtype=np.float64), kind="stable") for g in graph.groups
    )
    settings = ProblemSettings(
        max_ratio=MAX_RATIO,
        eval_samples=spec["eval_samples"],
        bn_recalib_batches=spec["bn_recalib_batches"],
        finetune_steps=spec.get("finetune_steps", 0),
        seed=seed,
    )
    context = ProxyContext(
        base, graph, rankings, splits, splits.example_inputs(), settings, torch.device("cpu")
    )
    cls = SupernetProxy if spec["kind"] == "supernet" else PruningNetProxy
    return cls(context, SupernetConfig(**spec["config"]))


def load_rows(paths: list[str]) -> tuple[dict, dict[int, dict]]:
    """Rows of earlier --out files by policy number. A policy measured in several runs is merged: proxies
    (new variants against a reused ground truth) by label, and fine-tunes with other seeds
    (--truth-seed-start) into one ground truth averaged over every seed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    by_policy: dict[int, dict] = {}
    for run in runs:
        for position, row in enumerate(run["rows"]):
            policy = row.get("policy", run["args"].get("skip", 0) + position)
            row = {**row, "truth_seeds": row.get("truth_seeds", list(range(run["args"]["truth_seeds"])))}
            if policy not in by_policy:
                by_policy[policy] = {**row, "proxies": dict(row["proxies"])}
                continue
            merged = by_policy[policy]
            if not np.allclose(merged["ratios"], row["ratios"], atol=1e-4):
                raise ValueError(f"policy {policy} differs between the files: not the same run")
            merged["proxies"].update(row["proxies"])
            new_seeds = [k for k in row["truth_seeds"] if k not in merged["truth_seeds"]]
            if new_seeds:
                if len(new_seeds) != len(row["truth_seeds"]):
                    raise ValueError(f"policy {policy}: fine-tune seeds overlap partly between the files")
                n_old, n_new = len(merged["truth_seeds"]), len(new_seeds)
                for metric in ("finetuned_test_accuracy", "finetuned_val_accuracy", "finetuned_test_loss"):
                    merged[metric] = (n_old * merged[metric] + n_new * row[metric]) / (n_old + n_new)
                merged["finetuned_test_accuracy_per_seed"] = (
                    merged["finetuned_test_accuracy_per_seed"] + row["finetuned_test_accuracy_per_seed"]
                )
                merged["truth_seeds"] = merged["truth_seeds"] + new_seeds
    return runs[0]["args"], by_policy


def report(paths: list[str]) -> None:
    """The table of one run saved with --out, of one run split over processes with --skip, or of runs
    that added variants with --truth-from. Variants measured on only some policies are left out."""
    args, by_policy = load_rows(paths)
    trained: dict[str, float] = {}
    for p in paths:
        trained.update(json.loads(Path(p).read_text()).get("trained", {}))
    rows = [by_policy[i] for i in sorted(by_policy)]
    args = {**args, "truth_seeds": min(len(r["truth_seeds"]) for r in rows)}
    labels = [k for k in rows[0]["proxies"] if all(k in r["proxies"] for r in rows)]
    for k in {k for r in rows for k in r["proxies"]} - set(labels):
        print(
            f"(variant {k} left out: measured on {sum(k in r['proxies'] for r in rows)}/{len(rows)} policies)"
        )
    table(args, [{**r, "proxies": {k: r["proxies"][k] for k in labels}} for r in rows], trained)


def table(args: dict, rows: list[dict], trained: dict[str, float] | None = None) -> None:
    truth_acc = np.array([r["finetuned_test_accuracy"] for r in rows])
    truth_loss = np.array([r["finetuned_test_loss"] for r in rows])
    print()
    print(
        f"{args['model']} on {args['dataset']}: {len(rows)} random policies at {args['budget']:.0%} MACs "
        f"(achieved {min(r['macs_fraction'] for r in rows):.3f}-{max(r['macs_fraction'] for r in rows):.3f}); "
        f"ground truth: test accuracy after {args['finetune_epochs']} KD epochs"
        + (f", mean of {args['truth_seeds']} seeds" if args["truth_seeds"] > 1 else "")
        + (f" on {args['finetune_samples']} training samples" if args["finetune_samples"] else "")
        + f" (range {truth_acc.min():.4f}-{truth_acc.max():.4f}, mean {np.mean([r['finetune_seconds'] for r in rows]):.1f} s)"
    )
    print()
    print(
        "| proxy | tau(acc, ft acc) | tau(-loss, ft acc) | tau(-kl, ft acc) | tau(loss, ft loss) "
        "| spearman(acc) | s / eval |"
    )
    print("|---|---|---|---|---|---|---|")
    for label in rows[0]["proxies"]:
        acc = np.array([r["proxies"][label]["accuracy"] for r in rows])
        loss = np.array([r["proxies"][label]["loss"] for r in rows])
        secs = np.mean([r["proxies"][label]["eval_seconds"] for r in rows])
        tau_acc = kendalltau(acc, truth_acc).statistic
        tau_loss = kendalltau(-loss, truth_acc).statistic
        tau_ll = kendalltau(loss, truth_loss).statistic
        kl = [r["proxies"][label].get("kl_to_teacher") for r in rows]
        tau_kl = "" if None in kl else f"{kendalltau(-np.array(kl), truth_acc).statistic:.3f}"
        rho = spearmanr(acc, truth_acc).statistic
        print(
            f"| {label} | {tau_acc:.3f} | {tau_loss:.3f} | {tau_kl} | {tau_ll:.3f} | {rho:.3f} | {secs:.3f} |"
        )
    for label, seconds in (trained or {}).items():
        if label in rows[0]["proxies"]:
            print(f"| {label}: one-off training | {seconds:.0f} s | | | | | |")
    n_seeds = args["truth_seeds"]
    if n_seeds > 1:
        # The ground truth's own noise: fine-tunes of the same policies with different seeds. A proxy
        # cannot be expected to rank better than one more fine-tune would.
        per_seed = np.array([r["finetuned_test_accuracy_per_seed"][:n_seeds] for r in rows]).T
        pairs = [(a, b) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
        tau_pairs = [kendalltau(per_seed[a], per_seed[b]).statistic for a, b in pairs]
        rho_pairs = [spearmanr(per_seed[a], per_seed[b]).statistic for a, b in pairs]
        print(
            f"| fine-tune noise: one seed vs another (mean of {len(pairs)} pairs) | {np.mean(tau_pairs):.3f} "
            f"| | | | {np.mean(rho_pairs):.3f} | |"
        )
        if n_seeds > 2:
            rest = [
                kendalltau(per_seed[k], np.delete(per_seed, k, axis=0).mean(0)).statistic
                for k in range(n_seeds)
            ]
            print(
                f"| fine-tune noise: one seed vs the mean of the other {n_seeds - 1} | {np.mean(rest):.3f} | | | | | |"
            )


def fine_tuned_truth(
    args: argparse.Namespace, pruned: torch.nn.Module, base: torch.nn.Module, tune_splits: Splits
) -> dict[str, Any]:
    """The ground truth of one policy: test metrics after the KD fine-tune, averaged over seeds."""
    start = time.perf_counter()
    seeds = [args.truth_seed_start + k for k in range(args.truth_seeds)]
    runs = [
        finetune(pruned, base, tune_splits, epochs=args.finetune_epochs, seed=args.seed + k, progress=False)[
            1
        ]
        for k in seeds
    ]
    return {
        "truth_seeds": seeds,
        "finetuned_test_accuracy": float(np.mean([r["test_accuracy"] for r in runs])),
        "finetuned_test_accuracy_per_seed": [r["test_accuracy"] for r in runs],
        "finetuned_val_accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
        "finetuned_test_loss": float(np.mean([r["test_loss"] for r in runs])),
        "finetune_seconds": (time.perf_counter() - start) / args.truth_seeds,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--policies", type=int, default=30)
    parser.add_argument(
        "--budget", type=float, default=0.5, help="target MACs as a fraction of the base model's"
    )
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument(
        "--finetune-samples",
        type=int,
        default=None,
        help="fine-tune on a fixed random subset of train this size",
    )
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument(
        "--variants", default="plain,bn2,bn8,bn8+kd10+re,bn8+kd25+re,bn8+kd50+re,bn8+kd100+re"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--truth-seeds",
        type=int,
        default=1,
        help="fine-tune every policy with this many seeds; the ground truth is their mean, and tau between "
        "the first two is the fine-tune's own noise level",
    )
    parser.add_argument(
        "--policy-seed",
        type=int,
        default=None,
        help="draw the random policies from this seed (default: --seed); a fresh set validates a proxy "
        "chosen on another",
    )
    parser.add_argument(
        "--truth-seed-start",
        type=int,
        default=0,
        help="fine-tune seeds start at --seed plus this: more seeds for an earlier run's ground truth "
        "(--report merges them)",
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="start at this policy (the same policies are drawn): split one run over several processes",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the table from --out files of earlier (possibly split) runs instead of measuring",
    )
    parser.add_argument(
        "--truth-from",
        nargs="+",
        default=None,
        metavar="JSON",
        help="reuse the ground truth of earlier --out files of the same policies (same --seed, --budget, "
        "--policies) and measure only the proxies: new variants without repeating the fine-tunes",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="write per-policy results as JSON here")
    return parser


def _check_truth_from(args: argparse.Namespace) -> dict[int, dict]:
    """The ground truth of earlier --truth-from files, made with the same policies and fine-tune."""
    saved_args, known = load_rows(args.truth_from)
    for option in (
        "dataset",
        "model",
        "seed",
        "policy_seed",
        "budget",
        "finetune_epochs",
        "finetune_samples",
    ):
        if saved_args.get(option) != getattr(args, option):
            raise SystemExit(
                f"--truth-from was measured with --{option.replace('_', '-')} {saved_args.get(option)}"
            )
    args.truth_seeds = saved_args["truth_seeds"]
    return known


def _proxies(
    args: argparse.Namespace, base: torch.nn.Module, graph: Any, splits: Any
) -> tuple[dict[str, ProxyEvaluator], dict[str, TrainedProxy]]:
    """The --variants: evaluators that score a pruned model, and trained proxies (supernets, PruningNets)."""
    evaluators: dict[str, ProxyEvaluator] = {}
    supernets: dict[str, TrainedProxy] = {}
    variants = parse_variants(args.variants, args.eval_samples) if args.variants != "none" else {}
    for label, kwargs in variants.items():
        if "kind" in kwargs:
            supernets[label] = trained_proxy(kwargs, base, graph, splits, args.seed)
        else:
            evaluators[label] = ProxyEvaluator(base, splits, seed=args.seed, **kwargs)
    return evaluators, supernets


def _proxy_row(result: Any, seconds: float, loss: float | None = None) -> dict[str, Any]:
    # The saved files keep their original keys (eval_seconds), so earlier results still merge.
    return {
        "accuracy": result.accuracy,
        "loss": result.loss if loss is None else loss,
        "kl_to_teacher": result.kl_to_teacher if loss is None else None,
        "eval_seconds": seconds,
    }


def _measure_proxies(
    pruned: torch.nn.Module,
    keep: np.ndarray,
    evaluators: dict[str, ProxyEvaluator],
    supernets: dict[str, TrainedProxy],
) -> dict[str, Any]:
    """Every proxy's score of one pruned model (a supernet's stage loss beside its score)."""
    measured: dict[str, Any] = {}
    for label, ev in evaluators.items():
        result = ev.evaluate(pruned)
        measured[label] = _proxy_row(result, result.seconds)
    for label, proxy in supernets.items():
        start = time.perf_counter()  # wall time: the sub-network's rebuild is part of the cost
        result = proxy.evaluate_policy(keep, lambda pruned=pruned: pruned)
        measured[label] = _proxy_row(result, time.perf_counter() - start)
        if isinstance(proxy, SupernetProxy):
            start = time.perf_counter()
            stage = proxy.stage_loss(keep)
            measured[f"{label}[stage loss]"] = _proxy_row(result, time.perf_counter() - start, loss=stage)
    return measured


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.policies, args.finetune_epochs = 6, 2
    if args.report:
        report(args.report)
        return

    splits = load(args.dataset, seed=args.seed)
    base, base_metrics = train_base(args.model, splits, seed=args.seed, progress=False)
    print(
        f"base {args.model} on {args.dataset}: test accuracy {base_metrics['test_accuracy']:.4f}", flush=True
    )
    tune_splits = splits.with_training_subset(args.finetune_samples or None, args.seed)

    example = splits.example_inputs()
    graph = prune_env.build_graph(base, example)
    base_macs = graph.macs(0.0)
    # Policies come from their own seed, so a second set (held out from choosing a proxy) can be drawn
    # over the same data split and base model.
    rng = np.random.default_rng(args.seed if args.policy_seed is None else args.policy_seed)
    policies = [random_policy(graph, args.budget * base_macs, rng) for _ in range(args.policies)]
    known = _check_truth_from(args) if args.truth_from else {}
    evaluators, supernets = _proxies(args, base, graph, splits)
    trained = {label: proxy.train_seconds for label, proxy in supernets.items()}
    rows = []
    for i, ratios in enumerate(policies):
        if i < args.skip or (args.truth_from and i not in known):
            continue
        pruned = prune_env.prune(base, example, ratios)
        macs = prune_env.count_macs(pruned, example)
        measured = {"proxies": _measure_proxies(pruned, graph.keep_counts(ratios), evaluators, supernets)}
        if args.truth_from:
            if not np.allclose(known[i]["ratios"], ratios, atol=1e-4):
                raise SystemExit(f"policy {i} differs from the one in --truth-from: not the same run")
            row = {**known[i], **measured}
        else:
            row = {**fine_tuned_truth(args, pruned, base, tune_splits), **measured}
        rows.append(
            {
                "policy": i,
                "ratios": [round(float(r), 4) for r in ratios],
                "macs_fraction": macs / base_macs,
                **row,
            }
        )
        if args.out:  # after every policy, so an interrupted run keeps what it measured
            write_results(args.out, {"args": vars(args), "trained": trained, "rows": rows})
        summary = " ".join(f"{k}={v['accuracy']:.3f}" for k, v in measured["proxies"].items())
        print(
            f"policy {i + 1:>3}/{len(policies)} macs={macs / base_macs:.3f} "
            f"finetuned test acc={row['finetuned_test_accuracy']:.4f} | {summary}",
            flush=True,
        )

    table(vars(args), rows, trained)
    print(f"\ntorch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
