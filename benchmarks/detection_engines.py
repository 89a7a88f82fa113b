"""torchvision's detectors and segmenters pruned by this engine and by Torch-Pruning, side by side.

    python benchmarks/detection_engines.py [--models fasterrcnn_resnet50_fpn ssd300_vgg16 ...]
        [--size 128] [--repeats 3] [--threads 1] [--out benchmarks/results/detection_engines.json]

Per model: each library's graph build time (median of ``--repeats``, the same model and input in one
process), then a uniform 0.5 pruning by each — this engine's ``prune``, Torch-Pruning's ``MetaPruner`` with
L1 magnitude importance and the same predictors ignored (the layers whose width is the output format:
class, box, mask, keypoint and centerness logits) — and whether the pruned model works: it runs in eval
mode with the model's own output format, and in train mode its losses are finite. "MACs kept" is a count on
the pruned model against the unpruned one (RoI counts fixed as in the tests: zero box regressors, no NMS or
score threshold). Torch-Pruning is optional (``pip install prune-env[bench]``). Results go to ``--out``
(JSON, with the provenance) and a table is printed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prune_env
from prune_env.app.measure import write_results
from prune_env.detection import PREDICTOR_SUFFIXES, example_targets, torchvision_detector

DETECTORS = [
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
]  # fmt: skip


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tp_build(tp: Any, model: nn.Module, images: list[torch.Tensor]) -> None:
    tp.DependencyGraph().build_dependency(model, example_inputs=[images])


def works(name: str, model: nn.Module, pruned: nn.Module, images: list[torch.Tensor], size: int) -> str:
    """ "ok", or what failed: the eval-mode output format, or a finite loss in train mode."""
    try:
        with torch.no_grad():
            expected, got = model(images)[0], copy.deepcopy(pruned).eval()(images)[0]
        if expected.keys() != got.keys() or any(got[k].shape[1:] != expected[k].shape[1:] for k in got):
            return "eval output differs in format"
        trainable = copy.deepcopy(pruned).train()
        losses = trainable([images[0], images[0]], example_targets(name, size))
        if not torch.isfinite(sum(losses.values())):
            return "loss not finite"
    except Exception as exc:  # the point of the table: which library's model breaks, and how
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return "ok"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=DETECTORS)
    parser.add_argument("--size", type=int, default=128, help="image size (the detectors' min and max size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/detection_engines.json"), help="where results go"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print("Torch-Pruning is not installed (pip install prune-env[bench]): this engine only")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model = torchvision_detector(name, args.size)
        images = [torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0))]
        base = prune_env.count_macs(model, (images,))
        row: dict[str, Any] = {"model": name}
        graph = prune_env.build_graph(model, (images,))
        row["ours_build_s"] = _median_seconds(
            functools.partial(prune_env.build_graph, model, (images,)), args.repeats
        )
        ours = prune_env.prune(model, (images,), 0.5, graph=graph)
        row["ours_macs_kept"] = prune_env.count_macs(ours, (images,)) / base
        row["ours_exact"] = graph.macs(0.5) == prune_env.count_macs(ours, (images,))
        row["ours_works"] = works(name, model, ours, images, args.size)
        if tp is not None:
            ignored = [m for n, m in model.named_modules() if n.endswith(PREDICTOR_SUFFIXES)]
            try:
                row["tp_build_s"] = _median_seconds(
                    functools.partial(_tp_build, tp, model, images), args.repeats
                )
                theirs = copy.deepcopy(model)
                pruner = tp.pruner.MetaPruner(
                    theirs, [images], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                    ignored_layers=[dict(theirs.named_modules())[n] for n, m in model.named_modules() if m in ignored],
                )  # fmt: skip
                pruner.step()
                row["tp_macs_kept"] = prune_env.count_macs(theirs, (images,)) / base
                row["tp_works"] = works(name, model, theirs, images, args.size)
            except Exception as exc:  # Torch-Pruning refusing or breaking a model is a result
                row["tp_works"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        rows.append(row)
        print(row, flush=True)
        # Written after every model: a run stopped part-way (Torch-Pruning can take many minutes on one
        # model) keeps what it measured.
        write_results(args.out, {"settings": settings, "runs": rows})
    print(f"\n{'model':<40} {'ours s':>7} {'kept':>6} {'works':<6} {'TP s':>7} {'kept':>6}  TP works")
    for r in rows:
        tp_s, tp_kept = r.get("tp_build_s", float("nan")), r.get("tp_macs_kept", float("nan"))
        print(
            f"{r['model']:<40} {r['ours_build_s']:7.3f} {r['ours_macs_kept']:6.3f} {r['ours_works']:<6} "
            f"{tp_s:7.3f} {tp_kept:6.3f}  {r.get('tp_works', '-')}"
        )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
