"""Train the Fashion-MNIST base model (resnet20 by default) and print its accuracy and wall time.

    python benchmarks/fashion_mnist_base.py [--model resnet20] [--epochs N] [--threads 1] [--quick]

The checkpoint lands in the prune_env cache (``$PRUNE_ENV_CACHE`` or ``~/.cache/prune_env``), so a second
run, and every later benchmark or environment on the same settings, loads it in seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from prune_env.data import load
from prune_env.train import RECIPES, train_base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints its table to standard output; the only file it writes is the checkpoint in the cache.",
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {RECIPES['fashion-mnist'].epochs}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="one epoch: a smoke run, not the reported number"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    splits = load("fashion-mnist", root=args.root, seed=args.seed)
    epochs = 1 if args.quick else args.epochs
    _, metrics = train_base(args.model, splits, seed=args.seed, epochs=epochs, progress=not args.no_progress)
    wall = time.perf_counter() - start
    print("| model | epochs | train/val/test | val acc | test acc | train s | wall s | cached |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {int(metrics['epochs'])} | {len(splits.train)}/{len(splits.val)}/{len(splits.test)} "
        f"| {metrics['val_accuracy']:.4f} | {metrics['test_accuracy']:.4f} | {metrics['train_seconds']:.0f} "
        f"| {wall:.0f} | {bool(metrics['cached'])} |"
    )
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
