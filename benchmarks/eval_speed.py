"""Inference throughput (images/s) of full and physically pruned CIFAR ResNets on this machine.

    python benchmarks/eval_speed.py [--models resnet20,resnet56] [--budgets 1.0,0.5,0.25] [--threads N]

Each pruned model is the physically smaller network ``prune_env.prune`` returns (not a masked full-size
one), run in eval mode under ``torch.inference_mode()`` as the proxy does, at several batch sizes.
"""

from __future__ import annotations

import argparse
import time

import torch

import prune_env
from prune_env.models import get_model


def images_per_second(
    model: torch.nn.Module, shape: tuple[int, ...], batch_size: int, min_seconds: float
) -> float:
    x = torch.randn(batch_size, *shape)
    model.eval()
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations and kernel selection
        count, start = 0, time.perf_counter()
        while True:
            model(x)
            count += batch_size
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return count / elapsed


def uniform_ratio_for(graph: prune_env.DependencyGraph, budget: float) -> float:
    """The single per-group ratio whose pruned model has ``budget`` x the base MACs (bisection)."""
    target, lo, hi = budget * graph.macs(0.0), 0.0, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if graph.macs(mid) > target else (lo, mid)
    return hi


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints its tables to standard output and writes no file; committed runs are under benchmarks/results/, each with its command in that directory's README.md.",
    )
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--budgets", default="1.0,0.5,0.25", help="MACs fractions of the unpruned model")
    parser.add_argument("--batch-sizes", default="32,128,512")
    parser.add_argument("--input", default="3,32,32", help="C,H,W (3,32,32 is CIFAR; 1,8,8 is digits)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing window per measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.input.split(","))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.quick:
        args.seconds, batch_sizes = 0.3, batch_sizes[:2]

    print(f"input {shape}, torch threads {torch.get_num_threads()}, inference_mode, eval()")
    print(
        "| model | MACs fraction | MACs (M) | params (K) | "
        + " | ".join(f"bs {b} img/s" for b in batch_sizes)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(batch_sizes))
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = get_model(name, 10, shape[0]).eval()
        example = torch.zeros(1, *shape)
        graph = prune_env.build_graph(base, example)
        for budget in budgets:
            model = (
                base if budget >= 1.0 else prune_env.prune(base, example, uniform_ratio_for(graph, budget))
            )
            macs = prune_env.count_macs(model, example)
            rates = [images_per_second(model, shape, b, args.seconds) for b in batch_sizes]
            print(
                f"| {name} | {macs / graph.macs(0.0):.2f} | {macs / 1e6:.1f} | {prune_env.count_params(model) / 1e3:.0f} | "
                + " | ".join(f"{r:,.0f}" for r in rates)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
