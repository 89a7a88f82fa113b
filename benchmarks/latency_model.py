"""Predicted against measured latency of pruned models: how far the latency tables can be trusted.

    python benchmarks/latency_model.py [--models resnet20 vgg11_quarter mobilenetv2_half tv:resnet18
        tv:mobilenet_v2] [--batches 1 32] [--policies 30] [--threads 1]
        [--out benchmarks/results/latency_model/results.json] [--report]

For each model and batch: a latency table is measured now (never read from the cache: the point is the
protocol's agreement on this machine, now), then ``--policies`` random pruning policies (a random overall
level in [0, 0.9] with a per-group spread, so the policies cover the cost range and are not uniform) are
applied to the model, each pruned model is measured by the table's protocol and set beside the table's
prediction. The zoo's small models run on Fashion-MNIST's shape (1 x 28 x 28), the torchvision ones at
3 x 64 x 64, all with random weights (latency does not depend on the weights' values).

Printed per model and batch: the median and 95th percentile of |predicted - measured| / measured, the
signed median (positive: the table over-predicts), how many measurements stayed noisy, and the protocol's
own noise (how far three identical measurements of the unpruned model move). Then channel alignment: each
model pruned uniformly at three levels with ``round_to`` 1 and 8, measured and predicted, so the table
shows whether widths rounded to multiples of 8 buy speed on this CPU beyond their MACs.

Results are one JSON file (one entry per model and batch, written as each finishes, so an interrupted run
resumes where it stopped) recording the revision, library versions, hardware and command of every
invocation that wrote it, and the load average before and after each entry. Measure on a quiet machine: another process on the cores is measured with the model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import prune_env
from prune_env.app.measure import PROVENANCE, load_average, write_results
from prune_env.budget import keep_to_ratios
from prune_env.latency import LatencySettings, estimate_noise, latency_model, measure_pruned
from prune_env.latency.measure import module_forward
from prune_env.models import get_model

DEFAULT_MODELS = ["resnet20", "vgg11_quarter", "mobilenetv2_half", "tv:resnet18", "tv:mobilenet_v2"]
GOAL_MEDIAN, GOAL_P95 = 0.05, 0.15  # the latency model's goals: median and 95th percentile |relative error|
ALIGNMENT_LEVELS = (0.3, 0.5, 0.7)  # uniform pruning ratios at which round_to 1 and 8 are compared
ALIGNMENT_ROUND_TO = 8
SETTINGS = ("policies", "threads", "repeats", "seed", "round_to")  # a results file holds one of each


def input_shape(model: str) -> tuple[int, int, int]:
    """(channels, height, width): torchvision models at 3 x 64 x 64, the zoo's on Fashion-MNIST's shape."""
    return (3, 64, 64) if model.startswith("tv:") else (1, 28, 28)


def random_ratios(groups: int, count: int, seed: int, max_ratio: float = 0.9) -> list[np.ndarray]:
    """``count`` ratio vectors: an overall level uniform in [0, max_ratio] per policy, each group's ratio the
    level plus Gaussian spread (sd 0.15), clipped."""
    rng = np.random.default_rng(seed)
    policies = []
    for _ in range(count):
        level = rng.uniform(0.0, max_ratio)
        policies.append(np.clip(level + rng.normal(0.0, 0.15, groups), 0.0, max_ratio))
    return policies


def pruned_model(model: torch.nn.Module, x: torch.Tensor, graph: Any, keep: np.ndarray) -> torch.nn.Module:
    units = np.array([g.units for g in graph.groups])
    ratios = keep_to_ratios(units, keep)
    assert np.array_equal(graph.keep_counts(ratios), keep), "ratios must map back to the same counts"
    return prune_env.prune(model, x, ratios, graph=graph)


def measure_entry(
    name: str, batch: int, threads: int, policies: int, seed: int, repeats: int, round_to: int
) -> dict[str, Any]:
    """One model at one batch: its table, the random policies' predicted and measured latency, the
    protocol's noise, and the alignment comparison."""
    load_before = load_average()
    started = time.perf_counter()
    torch.manual_seed(seed)
    channels, height, width = input_shape(name)
    model = get_model(name, 10, channels).eval()
    x = torch.randn(1, channels, height, width)
    settings = LatencySettings(batch=batch, threads=threads, repeats=repeats, progress=True)
    lat = latency_model(model, x, settings, cache=False, architecture=name.replace(":", "-"))
    graph = lat.graph
    units = np.array([g.units for g in graph.groups])
    noise = estimate_noise(module_forward(model, x, settings), settings)
    rows = []
    keeps = [graph.keep_counts(r, round_to) for r in random_ratios(len(units), policies, seed)]
    for keep in tqdm(keeps, desc=f"{name} batch {batch}", leave=False):
        timing = measure_pruned(pruned_model(model, x, graph, keep), x, settings)
        predicted = float(lat.predict(keep))
        rows.append(
            {
                "keep": keep.tolist(),
                "macs_ratio": graph.costs.macs(keep) / graph.base_macs,
                "predicted_ms": predicted,
                "measured_ms": timing.median_ms,
                "iqr_ms": timing.iqr_ms,
                "noisy": timing.noisy,
                "error": (predicted - timing.median_ms) / timing.median_ms,
            }
        )
    alignment = []
    for level in ALIGNMENT_LEVELS:
        for round_to in (1, ALIGNMENT_ROUND_TO):
            keep = graph.keep_counts(level, round_to)
            timing = measure_pruned(pruned_model(model, x, graph, keep), x, settings)
            alignment.append(
                {
                    "level": level,
                    "round_to": round_to,
                    "macs_ratio": graph.costs.macs(keep) / graph.base_macs,
                    "predicted_ms": float(lat.predict(keep)),
                    "measured_ms": timing.median_ms,
                    "noisy": timing.noisy,
                }
            )
    return {
        "model": name,
        "batch": batch,
        "threads": threads,
        "round_to": round_to,
        "input_shape": [channels, height, width],
        "groups": len(units),
        "base_ms": lat.full_ms,
        "residual_ms": lat.table.residual_ms,
        "table_noisy_points": lat.table.noisy_points,
        "noise_medians_ms": list(noise.medians_ms),
        "noise_relative_spread": noise.relative_spread,
        "policies": rows,
        "alignment": alignment,
        "seconds": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": load_average(),
    }


def summarise(entry: dict[str, Any]) -> dict[str, float]:
    errors = np.array([r["error"] for r in entry["policies"]])
    absolute = np.abs(errors)
    return {
        "median_abs": float(np.median(absolute)),
        "p95_abs": float(np.percentile(absolute, 95)),
        "max_abs": float(absolute.max()),
        "median_signed": float(np.median(errors)),
        "noisy": int(sum(r["noisy"] for r in entry["policies"])),
    }


def made_by(results: dict[str, Any]) -> list[str]:
    """The report's head: the revision(s), machine and settings, and each command that wrote the file."""
    # Files written before the shared results writer hold their first record at their top level.
    records = ([results] if "revision" in results else []) + list(results.get(PROVENANCE, []))
    first = records[0]
    revisions = ", ".join(dict.fromkeys(str(r["revision"]) for r in records))
    commands = [
        r["command"] if isinstance(r["command"], str) else shlex.join(["python", *r["command"]])
        for r in records
    ]
    return [
        f"revision {revisions}; {first['hardware']['cpu_model']}, {first['hardware']['cpu_count']} cores; "
        f"torch {first['versions'].get('torch')}; settings "
        + ", ".join(f"{k} {v}" for k, v in results["settings"].items()),
        *(f"command: {c}" for c in commands),
    ]


def report(results: dict[str, Any]) -> str:
    lines = [
        *made_by(results),
        "",
        f"{'model':<18}{'batch':>6}{'base ms':>10}{'noise':>8}{'median |err|':>14}{'p95 |err|':>11}"
        f"{'max':>8}{'signed':>9}{'noisy':>7}{'goal':>6}{'load':>14}",
    ]
    met_all = True
    for e in results["entries"]:
        s = summarise(e)
        met = s["median_abs"] <= GOAL_MEDIAN and s["p95_abs"] <= GOAL_P95
        met_all &= met
        load = f"{e['load_before'][0]:.1f}->{e['load_after'][0]:.1f}"
        lines.append(
            f"{e['model']:<18}{e['batch']:>6}{e['base_ms']:>10.3f}{e['noise_relative_spread']:>8.1%}"
            f"{s['median_abs']:>14.1%}{s['p95_abs']:>11.1%}{s['max_abs']:>8.1%}{s['median_signed']:>+9.1%}"
            f"{s['noisy']:>7}{'met' if met else 'no':>6}{load:>14}"
        )
    lines += [
        "",
        f"goal: median |err| <= {GOAL_MEDIAN:.0%} and p95 <= {GOAL_P95:.0%} on every model and batch: "
        + ("met" if met_all and results["entries"] else "not met"),
        "",
        f"channel alignment: uniform pruning with round_to 1 against round_to {ALIGNMENT_ROUND_TO} "
        "(measured ms per MACs ratio; aligned/unaligned below 1 = alignment buys speed beyond its MACs)",
        f"{'model':<18}{'batch':>6}{'level':>7}{'MACs r=1':>10}{'MACs r=8':>10}{'ms r=1':>9}{'ms r=8':>9}"
        f"{'ms ratio':>10}{'per-MAC ratio':>15}",
    ]
    for e in results["entries"]:
        by = {(a["level"], a["round_to"]): a for a in e["alignment"]}
        for level in ALIGNMENT_LEVELS:
            one, aligned = by[(level, 1)], by[(level, ALIGNMENT_ROUND_TO)]
            ms_ratio = aligned["measured_ms"] / one["measured_ms"]
            per_mac = ms_ratio / (aligned["macs_ratio"] / one["macs_ratio"])
            lines.append(
                f"{e['model']:<18}{e['batch']:>6}{level:>7.1f}{one['macs_ratio']:>10.3f}"
                f"{aligned['macs_ratio']:>10.3f}{one['measured_ms']:>9.3f}{aligned['measured_ms']:>9.3f}"
                f"{ms_ratio:>10.3f}{per_mac:>15.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--policies", type=int, default=30, help="random policies per model and batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11, help="timed samples per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="the random policies' kept counts rounded to multiples of this",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_model/results.json"))
    parser.add_argument("--report", action="store_true", help="print the report of --out and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.out.read_text())))
        return
    if args.out.exists():
        results = json.loads(args.out.read_text())
        if results["settings"] != {k: vars(args)[k] for k in SETTINGS}:
            sys.exit(f"{args.out} was made with {results['settings']}: use another --out")
    else:
        results = {"settings": {k: vars(args)[k] for k in SETTINGS}, "entries": []}
    done = {(e["model"], e["batch"]) for e in results["entries"]}
    for name in args.models:
        for batch in args.batches:
            if (name, batch) in done:
                continue
            results["entries"].append(
                measure_entry(
                    name, batch, args.threads, args.policies, args.seed, args.repeats, args.round_to
                )
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_results(args.out, results)
    # The file as written: it holds this invocation's provenance record, which the report's head names.
    print(report(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
