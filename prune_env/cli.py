"""The ``prune-env`` command line: search, list, eval, export, demo.

Every subcommand reports bad arguments (unknown model, agent or dataset, impossible target) in one clear
line, ``prune-env: error: ...``, with exit status 2 rather than a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

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


def _search(args: argparse.Namespace) -> int:
    """Train or load the base model, search, fine-tune the best policy with KD, save everything."""
    from prune_env.job import SearchSettings, run_search

    metric, target = (
        ("params", args.target_params) if args.target_params is not None else ("macs", args.target_macs)
    )
    settings = SearchSettings(
        out=Path(args.out),
        model=args.model,
        dataset=args.dataset,
        metric=metric,
        target=0.5 if target is None else target,
        agent=args.agent,
        evals=args.evals,
        seed=args.seed,
        reward=args.reward,
        eval_samples=args.eval_samples,
        max_ratio=args.max_ratio,
        fill_budget=args.fill_budget,
        finetune_epochs=args.finetune_epochs,
        resume=args.resume,
        progress=not args.no_progress,
        device=args.device,
        argv=list(args.argv),
    )
    return run_search(settings)


def _list(args: argparse.Namespace) -> int:
    """Print the names every other subcommand accepts."""
    from prune_env.data import DATASET_NAMES
    from prune_env.job import DEFAULT_AGENTS, agent_registry
    from prune_env.models import available_models
    from prune_env.rewards import PRESETS

    agents = sorted(agent_registry())
    default = next((a for a in DEFAULT_AGENTS if a in agents), None)
    print("models:   " + ", ".join(available_models()) + ", tv:NAME (any torchvision classifier)")
    print("datasets: " + ", ".join(DATASET_NAMES))
    print("agents:   " + ", ".join(a + (" (default)" if a == default else "") for a in agents))
    print("rewards:  " + ", ".join(PRESETS))
    return 0


def _saved(path: str) -> tuple[torch.nn.Module, dict]:
    from prune_env.checkpoint import load_pruned, read_spec

    return load_pruned(path), read_spec(path)


def _eval(args: argparse.Namespace) -> int:
    """Score a saved pruned model on the test split of its dataset."""
    from prune_env import count_macs, count_params
    from prune_env.data import load
    from prune_env.train import evaluate

    model, spec = _saved(args.path)
    meta = spec.get("meta", {})
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise PruneEnvError(f"{args.path} does not name its dataset; pass --dataset")
    # The split is seeded: score on the test split the model was never tuned on.
    seed = args.seed if args.seed is not None else int(meta.get("seed", 0))
    splits = load(dataset, seed=seed)
    x = torch.zeros(1, *spec["input_shape"])
    metrics = evaluate(model, getattr(splits, args.split), device=args.device)
    print(f"model:    {args.path} ({spec.get('architecture') or 'custom'} pruned)")
    print(f"dataset:  {dataset} (seed {seed}), {args.split} split, {int(metrics['samples'])} samples")
    print(f"accuracy: {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}")
    print(f"MACs:     {count_macs(model, x):,}")
    print(f"params:   {count_params(model):,}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Write a saved pruned model as ONNX."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise PruneEnvError("ONNX export needs the onnx package: pip install onnx")
    model, spec = _saved(args.path)
    x = torch.zeros(1, *spec["input_shape"])
    out = Path(args.onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The torch.export-based exporter needs onnxscript; the TorchScript one needs only onnx.
    dynamo = importlib.util.find_spec("onnxscript") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            str(out),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=dynamo,
        )
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune-env", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    search = sub.add_parser(
        "search",
        help="search a pruning policy, fine-tune the result, save model and results",
        description="Train or load the base model, search pruning policies under a cost budget, fine-tune "
        "the best policy's model with knowledge distillation and save everything under --out.",
    )
    search.add_argument("--model", default="resnet20", help="zoo name or tv:NAME (see `prune-env list`)")
    search.add_argument("--dataset", default="digits", help="dataset name (see `prune-env list`)")
    budget = search.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-macs", type=float, help="MACs budget as a fraction of the base model's (default 0.5)"
    )
    budget.add_argument(
        "--target-params", type=float, help="parameter budget as a fraction of the base model's"
    )
    search.add_argument(
        "--agent", default=None, help="search method (default: evolution; see `prune-env list`)"
    )
    search.add_argument("--evals", type=int, default=100, help="evaluation budget (default 100)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    search.add_argument("--reward", default="acc", help="reward preset (default acc)")
    search.add_argument("--finetune-epochs", type=int, default=3, help="KD fine-tune epochs (default 3)")
    search.add_argument(
        "--eval-samples", type=int, default=1000, help="validation samples per proxy evaluation"
    )
    search.add_argument("--max-ratio", type=float, default=0.8, help="largest fraction of a group removed")
    search.add_argument(
        "--fill-budget",
        action="store_true",
        help="spend the budget: scale back policies that prune more than the target needs",
    )
    search.add_argument("--resume", action="store_true", help="continue the run in --out")
    search.add_argument("--no-progress", action="store_true", help="no progress bars")
    search.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    search.set_defaults(func=_search)

    lister = sub.add_parser("list", help="name the models, datasets, agents and reward presets")
    lister.set_defaults(func=_list)

    ev = sub.add_parser("eval", help="score a saved pruned model")
    ev.add_argument("path", help="a saved model directory (e.g. runs/quickstart/model)")
    ev.add_argument("--dataset", default=None, help="default: the dataset the model was pruned on")
    ev.add_argument("--seed", type=int, default=None, help="dataset split seed (default: the run's seed)")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a saved pruned model as ONNX (needs the onnx package)")
    export.add_argument("path", help="a saved model directory")
    export.add_argument("--onnx", required=True, help="output .onnx file")
    export.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="prune a torchvision model and print its dependency groups")
    demo.add_argument("--model", default="resnet18")
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--resolution", type=int, default=64)
    demo.set_defaults(func=_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except (PruneEnvError, ValueError) as exc:  # bad arguments and impossible targets, not bugs
        print(f"prune-env: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prune-env: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
