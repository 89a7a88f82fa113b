"""Joint pruning + quantization against pruning alone and quantization alone, at equal BitOps.

For each BitOps budget (a fraction of the unpruned model's at 32 bits):

- ``quantization alone``: no pruning, every convolution and linear layer at the largest bit-width b with
  b x b / 1024 within the budget;
- ``pruning alone (8-bit)``: uniform pruning with every layer at 8 bits (the ``uniform`` agent on a joint
  problem), the usual deployment precision;
- ``joint, <agent>``: a search over ratios and per-group weight / activation bits (``random``, ``ppo``, ...)
  with ``--evals`` proxy evaluations.

Each final policy gets the harness's final fine-tune (:func:`prune_env.app.finetune_recipe.finetune_accuracy`
with the policy's bit plan): KD from the base model in floating point, starting from the pruned model as
the proxy prepared it, ``--finetune-epochs`` on one fixed subset of ``--finetune-samples`` training images;
then it is quantized as its plan says (activation ranges calibrated on the quantized proxy's fixed training
batches) and scored on validation and test, which nothing else reads.

    python benchmarks/joint_quantization.py --dataset fashion-mnist --model vgg11_quarter \\
        --targets 0.01 0.02 0.04 --agents random ppo --evals 60 --finetune-epochs 3 --out joint.json
    python benchmarks/joint_quantization.py --report joint.json --plot joint.png

Rows are written to ``--out`` as they finish, with the revision, versions, hardware and command of every
invocation that wrote them; a rerun with the same file skips them (a file written before the scripts shared
the harness's fine-tune is refused rather than extended).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import search
from prune_env import PruningProblem
from prune_env.app.finetune_recipe import finetune_accuracy, resumable_results
from prune_env.app.measure import write_results
from prune_env.quantization import BIT_CHOICES, BitPlan, quantizable_layers
from prune_env.quantization.costs import bitops, size_bits


def quantization_alone(problem: PruningProblem, target: float) -> tuple[np.ndarray, BitPlan] | None:
    """No pruning, all layers at the largest bit-width whose BitOps fit (None when none does)."""
    full = problem.units.copy()
    layers = quantizable_layers(problem.base_model)
    for bits in sorted((b for b in BIT_CHOICES if b < 32), reverse=True):
        plan = BitPlan.uniform(layers, bits)
        if bitops(problem.graph.costs, full, plan) <= target * problem.joint.base_bitops:  # type: ignore[union-attr]
            return full, plan
    return None


def final_accuracy(
    problem: PruningProblem, keep: np.ndarray, plan: BitPlan, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    """The harness's final fine-tune of ``keep`` quantized as ``plan`` says, and the policy's costs."""
    start = time.perf_counter()
    val, test = finetune_accuracy(problem, keep, args.finetune_epochs, args.finetune_samples, seed, plan=plan)
    costs = problem.graph.costs
    joint = problem.joint
    assert joint is not None
    return {
        "val_accuracy": val,
        "test_accuracy": test,
        "bitops_ratio": bitops(costs, keep, plan) / joint.base_bitops,
        "size_ratio": size_bits(costs, keep, plan) / joint.base_size_bits,
        "macs_ratio": costs.macs(keep) / problem.graph.base_macs,
        "finetune_seconds": time.perf_counter() - start,
    }


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    saved = resumable_results(out, vars(args))
    done = {(r["target"], r["method"], r["seed"]) for r in saved["rows"]}

    def save(row: dict[str, Any]) -> None:
        saved["rows"].append(row)
        write_results(out, saved)
        print(
            f"  {row['method']:<26} BitOps {row['target']:.3f}: test {row.get('test_accuracy', math.nan):.4f} "
            f"(val {row.get('val_accuracy', math.nan):.4f}), MACs {row.get('macs_ratio', math.nan):.3f}, "
            f"size {row.get('size_ratio', math.nan):.3f}",
            flush=True,
        )

    for target in args.targets:
        problem = PruningProblem(
            args.model, args.dataset, target_bitops=target, eval_samples=args.eval_samples, progress=False
        )
        for seed in args.seeds:
            if (target, "quantization alone", seed) not in done:
                found = quantization_alone(problem, target)
                row: dict[str, Any] = {"target": target, "method": "quantization alone", "seed": seed}
                if found is not None:
                    keep, plan = found
                    row.update(bits=plan.weight_bits(quantizable_layers(problem.base_model)[0]))
                    row.update(final_accuracy(problem, keep, plan, args, seed))
                save(row)
            for agent in ["uniform", *args.agents]:
                method = "pruning alone (8-bit)" if agent == "uniform" else f"joint, {agent}"
                if (target, method, seed) in done:
                    continue
                start = time.perf_counter()
                result = search(agent, problem, 1 if agent == "uniform" else args.evals, seed=seed)
                best = result.best_outcome
                keep = np.asarray(best.keep)
                plan = problem.joint.plan(np.array(best.weight_bits), np.array(best.activation_bits))  # type: ignore[union-attr]
                row = {
                    "target": target,
                    "method": method,
                    "seed": seed,
                    "evals": len(result.history),
                    "search_seconds": time.perf_counter() - start,
                    "proxy_accuracy": best.accuracy,
                    "weight_bits": list(best.weight_bits),
                    "activation_bits": list(best.activation_bits),
                    "keep": [int(k) for k in keep],
                }
                row.update(final_accuracy(problem, keep, plan, args, seed))
                save(row)
    report([str(out)], args.plot)


def report(paths: list[str], plot: str | None = None) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    print("| BitOps budget | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for t in targets:
        cells = []
        for m in methods:
            accs = [
                r["test_accuracy"]
                for r in rows
                if r["target"] == t and r["method"] == m and "test_accuracy" in r
            ]
            cells.append(
                f"{np.mean(accs):.4f}" + (f" ± {np.std(accs):.4f}" if len(accs) > 1 else "") if accs else "–"
            )
        print(f"| {t:g} | " + " | ".join(cells) + " |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            points = sorted(
                (r["bitops_ratio"], r["test_accuracy"])
                for r in rows
                if r["method"] == m and "test_accuracy" in r
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("BitOps (fraction of the unpruned 32-bit model)")
        ax.set_ylabel("test accuracy after fine-tune + quantization")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot: {plot}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="vgg11_quarter")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.01, 0.02, 0.04])
    parser.add_argument("--agents", nargs="+", default=["random", "ppo"])
    parser.add_argument("--evals", type=int, default=60)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="joint_quantization.json")
    parser.add_argument("--plot", default=None, help="write the Pareto plot (PNG) here")
    parser.add_argument("--report", nargs="+", metavar="JSON")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
