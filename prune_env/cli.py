"""The ``prune-env`` command line.

Subcommands are added by the issues that own them; every one reports bad arguments in one clear line
(exit status 2) rather than a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from prune_env.errors import PruneEnvError


def _demo(args: argparse.Namespace) -> int:
    """Prune a torchvision model and print its groups, predicted and measured costs."""
    import torchvision

    from prune_env import build_graph, count_macs, count_params, prune

    if args.model not in torchvision.models.list_models(module=torchvision.models):
        raise PruneEnvError(f"unknown torchvision model {args.model!r}; see torchvision.models.list_models()")
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.resolution, args.resolution)
    t0 = time.perf_counter()
    graph = build_graph(model, x)
    t1 = time.perf_counter()
    pruned = prune(model, x, args.ratio, graph=graph)
    t2 = time.perf_counter()
    print(graph.table())
    measured = count_macs(pruned, x)
    print(
        f"\n{args.model} at {args.resolution}px, ratio {args.ratio}: "
        f"MACs {graph.base_macs:,} -> {graph.macs(args.ratio):,} predicted, {measured:,} measured; "
        f"params {count_params(model):,} -> {count_params(pruned):,}; "
        f"graph {t1 - t0:.2f}s, prune {t2 - t1:.2f}s"
    )
    with torch.no_grad():
        print(f"output shape {tuple(pruned(x).shape)} (unpruned {tuple(model(x).shape)})")
    return 0 if measured == graph.macs(args.ratio) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune-env", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a torchvision model and print its dependency groups")
    demo.add_argument("--model", default="resnet18")
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--resolution", type=int, default=64)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PruneEnvError as exc:
        print(f"prune-env: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prune-env: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
