"""Graph-build and prune times per torchvision (or timm) model, and the ratio to Torch-Pruning's build.

    python benchmarks/graph_build.py [--zoo torchvision|timm] [--repeats 3] [--resolution 64]
                                     [--models resnet50 densenet121 ...]

A library that fails on a model is named in that row ("failed", with the error type) and the model is left
out of the geometric mean; ``--zoo timm`` needs timm (``pip install timm``) and builds models with
``pretrained=False``.

Timings on shared machines are noisy: each number is the median of ``--repeats`` runs, and the ratio
compares the two libraries within the same run on the same model and input. Torch-Pruning is optional
(``pip install torch-pruning``, extra ``bench``); without it only our times are printed.

``--fresh`` measures a user's first build instead: each library in a new process per model and repeat
(its import timed apart from the build, the model built and run once before either), so one-time costs —
imports, first-call kernels, registrations — count as they do for a user.

Both libraries are timed from compiled bytecode, as a wheel installs them: ``--fresh`` compiles this
package's modules first, since an editable install under ``PYTHONDONTWRITEBYTECODE=1`` (set on some machines
and containers) would otherwise recompile every module on each import, tripling this package's import time.

The ``fwd/TP`` column is one plain forward pass of the model on the same input (eval, no autograd, nothing
recorded) over Torch-Pruning's build: the floor for any graph capture that runs or traces the model once,
which Torch-Pruning's own build (a forward with autograd, then its graph walk) also pays. ``trace/TP`` is
this engine's torch.fx trace alone (the first of its three steps: trace, propagate channel ids, resolve
groups) over Torch-Pruning's whole build.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torchvision

import prune_env
from prune_env.app.measure import time_repeats
from prune_env.models import get_model

DEFAULT_MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "mobilenet_v2", "mobilenet_v3_large", "mnasnet1_0", "shufflenet_v2_x1_0", "squeezenet1_1",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_y_800mf", "convnext_tiny", "vgg16_bn", "alexnet",
]  # fmt: skip
TIMM_MODELS = [
    "resnet18", "resnet50d", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "resnest14d", "regnety_004",
    "efficientnet_b0", "tf_efficientnet_b0", "mixnet_s", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "ghostnet_100", "densenet121", "ese_vovnet19b_dw", "cspdarknet53", "repvgg_a0", "dm_nfnet_f0",
    "inception_v3", "convnext_atto", "edgenext_xx_small", "efficientvit_b0",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
]  # fmt: skip
TRANSFORMERS = ("vit_", "deit_", "swin_", "maxvit_")  # built for 224 px (position embeddings, windows)


def build_model(zoo: str, name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if zoo == "timm":
            return get_model(f"timm:{name}", num_classes=10).eval()
        return torchvision.models.get_model(name, weights=None).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints its tables to standard output and writes no file; committed runs are under benchmarks/results/, each with its command in that directory's README.md.",
    )
    parser.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--fresh", action="store_true", help="first builds, each in a new process")
    parser.add_argument("--child", choices=("prune_env", "torch_pruning"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models or (TIMM_MODELS if args.zoo == "timm" else DEFAULT_MODELS)
    if args.child:
        first_build(args.child, args.zoo, models[0], args.resolution)
        return
    if args.fresh:
        fresh_builds(args, models)
        return
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print("torch-pruning not installed: printing prune_env times only\n")
    from prune_env.graph.ops import LIBRARY_LEAVES  # here, not above: --fresh children time this import
    from prune_env.graph.tracing import trace

    header = f"{'model':<22} {'groups':>6} {'build s':>8} {'prune s':>8}"
    if tp is not None:
        header += f" {'TP build s':>10} {'ratio':>6} {'fwd/TP':>6} {'trace/TP':>8}"
    print(header)
    ratios, floors, traces = [], [], []
    for name in models:
        model, x = build_model(args.zoo, name), _input(args.zoo, name, args.resolution)
        with torch.no_grad():
            model(x)  # warm up kernels once so neither library pays first-call costs
            forward = time_repeats(lambda m=model, x=x: m(x), args.repeats).median
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frozen-channel notices: not what is measured here
            try:
                graph = prune_env.build_graph(model, x)
                ours = time_repeats(lambda m=model, x=x: prune_env.build_graph(m, x), args.repeats).median
                pruning = time_repeats(
                    lambda m=model, x=x, g=graph: prune_env.prune(m, x, 0.5, graph=g), args.repeats
                ).median
                tracing = time_repeats(lambda m=model: trace(m, (), LIBRARY_LEAVES), args.repeats).median
            except Exception as exc:  # report and go on: the table says who fails where
                print(f"{name:<22} prune_env failed ({type(exc).__name__}: {str(exc)[:80]})", flush=True)
                continue
        line = f"{name:<22} {len(graph.groups):>6} {ours:>8.3f} {pruning:>8.3f}"
        if tp is not None:
            try:
                theirs = time_repeats(
                    lambda m=model, x=x: tp.DependencyGraph().build_dependency(m, example_inputs=x),
                    args.repeats,
                ).median
                ratios.append(ours / theirs)
                floors.append(forward / theirs)
                traces.append(tracing / theirs)
                line += f" {theirs:>10.3f} {ours / theirs:>6.2f} {forward / theirs:>6.2f} {tracing / theirs:>8.2f}"
            except Exception as exc:  # Torch-Pruning fails on some models; say so and go on
                line += f" {'failed':>10} ({type(exc).__name__})"
        print(line, flush=True)
    if ratios:
        print(
            f"\ngeometric mean ratio prune_env / Torch-Pruning build time: {geomean(ratios):.2f}x over "
            f"{len(ratios)} models; one plain forward / Torch-Pruning build: {geomean(floors):.2f}x; "
            f"this engine's trace alone / Torch-Pruning build: {geomean(traces):.2f}x"
        )


def _input(zoo: str, name: str, resolution: int) -> torch.Tensor:
    """The model's example input: ``resolution`` px, except where the architecture needs a size (Inception's
    stem; transformers' position embeddings and windows, and MaxViT's at 224 px)."""
    res = (299 if zoo == "torchvision" else 96) if name.startswith("inception") else resolution
    res = 224 if name.startswith(TRANSFORMERS) else res
    return torch.randn(1, 3, res, res)


def first_build(library: str, zoo: str, name: str, resolution: int) -> None:
    """In a new process: build the model and run it once, then import ``library`` and build its graph
    once; print the import and build seconds as JSON."""
    torch.set_num_threads(1)
    model, x = build_model(zoo, name), _input(zoo, name, resolution)
    with torch.no_grad():
        model(x)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    if library == "prune_env":
        import prune_env.graph as engine

        imported = time.perf_counter()
        engine.build_graph(model, x)
    else:
        import torch_pruning as tp

        imported = time.perf_counter()
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    done = time.perf_counter()
    print(json.dumps({"import": imported - start, "build": done - imported}))


def fresh_builds(args: argparse.Namespace, models: list[str]) -> None:
    """Each library's first build of each model, each in a new process, median over ``--repeats``."""
    libraries = ["prune_env", "torch_pruning"] if importlib.util.find_spec("torch_pruning") else ["prune_env"]
    # What a wheel install does (pip compiles a package's modules when installing it).
    compileall.compile_dir(prune_env.__path__[0], quiet=1)
    print(f"{'model':<22} " + " ".join(f"{lib + ' import':>22} {lib + ' build':>21}" for lib in libraries)
          + (f" {'ratio':>6} {'w/o import':>10}" if len(libraries) == 2 else ""))  # fmt: skip
    ratios, builds = [], []
    for name in models:
        medians = {}
        for lib in libraries:
            runs = []
            for _ in range(args.repeats):
                command = [sys.executable, __file__, "--child", lib, "--zoo", args.zoo, "--models", name,
                           "--resolution", str(args.resolution)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    break
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if runs:
                medians[lib] = {k: statistics.median(r[k] for r in runs) for k in ("import", "build")}
        line = f"{name:<22} " + " ".join(
            f"{medians[lib]['import']:>22.3f} {medians[lib]['build']:>21.3f}"
            if lib in medians
            else f"{'failed':>44}"
            for lib in libraries
        )
        if len(medians) == 2:
            ours, theirs = medians["prune_env"], medians["torch_pruning"]
            ratios.append((ours["import"] + ours["build"]) / (theirs["import"] + theirs["build"]))
            builds.append(ours["build"] / theirs["build"])
            line += f" {ratios[-1]:>6.2f} {builds[-1]:>10.2f}"
        print(line, flush=True)
    if ratios:
        print(f"\ngeometric mean ratio of first builds, prune_env / Torch-Pruning: {geomean(ratios):.2f}x with "
              f"imports, {geomean(builds):.2f}x without, over {len(ratios)} models")  # fmt: skip


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


if __name__ == "__main__":
    main()
