"""Channels-last against NCHW activations for the zoo's CNNs: one training step and one inference batch.

    python benchmarks/memory_format.py [--models resnet20 vgg11_quarter mobilenetv2_half] [--repeats 7]
        [--threads 1] [--pruned 0.5]

The zoo models convert their input to channels-last (``channels_last=True``, the default); this measures
what that buys, model by model, with the two layouts interleaved in one process: the median time of a
training step (forward, backward; batch 128) and of an inference batch (500 images, as the proxy scores
them), and the ratio channels-last / NCHW (below 1: faster). ``--pruned R`` also times each model with
every channel group pruned by the ratio R: the narrow shapes fine-tunes and proxy evaluations run on.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

import prune_env
from prune_env.app.measure import RepeatTimes, time_repeats
from prune_env.models import get_model


def interleaved(
    a: Callable[[], object], b: Callable[[], object], repeats: int
) -> tuple[RepeatTimes, RepeatTimes]:
    """``a`` and ``b`` timed in turn, so drifting load hits both alike; each timed call follows an untimed
    one of the same step (first-call allocations and kernel selection, after the other step ran)."""
    a_times: list[float] = []
    b_times: list[float] = []
    for _ in range(repeats):
        a_times += time_repeats(a, 1, warmup=1).seconds
        b_times += time_repeats(b, 1, warmup=1).seconds
    return RepeatTimes(tuple(a_times)), RepeatTimes(tuple(b_times))


def steps(model: nn.Module, size: int, channels: int) -> dict[str, Callable[[], object]]:
    train_x, eval_x = torch.randn(128, channels, size, size), torch.randn(500, channels, size, size)

    def train() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(train_x).sum().backward()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(eval_x)

    return {"train step": train, "inference": infer}


def variants(name: str, channels: int, pruned: float | None) -> dict[str, tuple[nn.Module, nn.Module]]:
    """(NCHW, channels-last) pairs of the same weights, full and optionally pruned."""
    torch.manual_seed(0)
    nchw = get_model(name, 10, channels)
    cast(Any, nchw).channels_last = False  # the zoo constructors' switch; same weights, NCHW activations
    last = get_model(name, 10, channels)
    last.load_state_dict(nchw.state_dict())
    pairs = {"full": (nchw, last)}
    if pruned is not None:
        example = torch.zeros(1, channels, 28, 28)
        pairs[f"pruned {pruned:.0%}"] = (
            prune_env.prune(nchw, example, pruned),
            prune_env.prune(last, example, pruned),
        )
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints its tables to standard output and writes no file; committed runs are under benchmarks/results/, each with its command in that directory's README.md.",
    )
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg11_quarter", "mobilenetv2_half"])
    parser.add_argument("--size", type=int, default=28, help="input height and width (Fashion-MNIST: 28)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--pruned", type=float, default=None, help="also time every group pruned by this ratio"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.repeats}")
    print("| model | | measure | NCHW ms | channels-last ms | channels-last / NCHW |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for name in args.models:
        for label, (nchw, last) in variants(name, args.channels, args.pruned).items():
            a_steps, b_steps = steps(nchw, args.size, args.channels), steps(last, args.size, args.channels)
            for measure in a_steps:
                a, b = interleaved(a_steps[measure], b_steps[measure], args.repeats)
                ratio = b.median / a.median
                ratios.append(ratio)
                print(
                    f"| {name} | {label} | {measure} | {1000 * a.median:.1f} | {1000 * b.median:.1f} | "
                    f"{ratio:.2f} |",
                    flush=True,
                )
    print(f"geometric mean of the ratios: {statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
