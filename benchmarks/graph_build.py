"""Graph-build and prune times per torchvision model, and the ratio to Torch-Pruning's graph build.

    python benchmarks/graph_build.py [--repeats 3] [--resolution 64] [--models resnet50 densenet121 ...]

Timings on shared machines are noisy: each number is the median of ``--repeats`` runs, and the ratio
compares the two libraries within the same run on the same model and input. Torch-Pruning is optional
(``pip install torch-pruning``, extra ``bench``); without it only our times are printed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchvision

import prune_env

DEFAULT_MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "mobilenet_v2", "mobilenet_v3_large", "mnasnet1_0", "shufflenet_v2_x1_0", "squeezenet1_1",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_y_800mf", "convnext_tiny", "vgg16_bn", "alexnet",
]  # fmt: skip


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print("torch-pruning not installed: printing prune_env times only\n")

    header = f"{'model':<22} {'groups':>6} {'build s':>8} {'prune s':>8}"
    if tp is not None:
        header += f" {'TP build s':>10} {'ratio':>6}"
    print(header)
    ratios = []
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None).eval()
        res = 299 if name.startswith("inception") else args.resolution
        x = torch.randn(1, 3, res, res)
        with torch.no_grad():
            model(x)  # warm up kernels once so neither library pays first-call costs
        graph = prune_env.build_graph(model, x)
        ours = median_seconds(lambda m=model, x=x: prune_env.build_graph(m, x), args.repeats)
        pruning = median_seconds(
            lambda m=model, x=x, g=graph: prune_env.prune(m, x, 0.5, graph=g), args.repeats
        )
        line = f"{name:<22} {len(graph.groups):>6} {ours:>8.3f} {pruning:>8.3f}"
        if tp is not None:
            try:
                theirs = median_seconds(
                    lambda m=model, x=x: tp.DependencyGraph().build_dependency(m, example_inputs=x),
                    args.repeats,
                )
                ratios.append(ours / theirs)
                line += f" {theirs:>10.3f} {ours / theirs:>6.2f}"
            except Exception as exc:  # Torch-Pruning fails on some models; say so and go on
                line += f" {'failed':>10} ({type(exc).__name__})"
        print(line, flush=True)
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(
            f"\ngeometric mean ratio prune_env / Torch-Pruning build time: {geo:.2f}x over {len(ratios)} models"
        )


if __name__ == "__main__":
    main()
