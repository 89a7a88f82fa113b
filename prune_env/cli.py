"""The ``prune-env`` command line: search, list, eval, export, demo.

Errors the user can fix — an unknown name, an impossible target, a bad option, a missing or tampered saved
model — are the library's typed errors (:class:`~prune_env.errors.PruneEnvError`) and argparse's own: each
is reported in one line, ``prune-env: error: ...``, with exit status 2 and no traceback. Anything else is a
bug in prune_env, not the user's mistake: it is shown as a crash (the traceback and a line asking to report
it, exit status 1). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from prune_env.errors import CheckpointError, InvalidSettingError, PruneEnvError, UnknownNameError
from prune_env.validation import MAX_SEED

# Largest --resolution of `demo`: beyond it one activation of a torchvision model no longer fits in memory.
MAX_DEMO_RESOLUTION = 2048


def _first_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


# ------------------------------------------------------------------------------------------------ demo


def _output_shape(output: Any) -> str:
    return str(tuple(output.shape)) if isinstance(output, torch.Tensor) else type(output).__name__


def _demo(args: argparse.Namespace) -> int:
    """Prune a torchvision model and print its groups, predicted and measured costs."""
    import torchvision

    from prune_env import build_graph, count_macs, count_params, prune

    if args.model not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownNameError(
            f"unknown torchvision model {args.model!r}; see torchvision.models.list_models()"
        )
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.resolution, args.resolution)
    # Some architectures need a minimum (or an exact) input size: find out with one plain forward pass,
    # so the user learns it is the resolution, not the pruning, that does not fit.
    try:
        with torch.no_grad():
            reference = model(x)
    except RuntimeError as exc:
        raise InvalidSettingError(
            f"{args.model} cannot run on {args.resolution}x{args.resolution} inputs ({_first_line(exc)}); "
            "pass a --resolution it accepts, e.g. 224"
        ) from None
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
        print(f"output shape {_output_shape(pruned(x))} (unpruned {_output_shape(reference)})")
    return 0 if measured == graph.macs(args.ratio) else 1


def _search(args: argparse.Namespace) -> int:
    """Train or load the base model, search, fine-tune the best policy with KD, save everything."""
    from prune_env.job import SearchSettings, out_path, run_search

    metric, target = (
        ("params", args.target_params) if args.target_params is not None else ("macs", args.target_macs)
    )
    settings = SearchSettings(
        out=out_path(args.out),
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


def _names_a_path(dataset: str) -> bool:
    """Whether a dataset name points into the file system (``imagefolder:PATH``, ``./data``, ``~/x``...)."""
    separators = {"/", "\\", ":", os.sep, *([os.altsep] if os.altsep else [])}
    return any(c in dataset for c in separators) or dataset.startswith(("~", "."))


def _eval_dataset(given: str | None, meta: dict[str, Any], path: str) -> str:
    """The dataset to score on: ``--dataset``, else the one the model's description names.

    A saved model is someone else's file: its description may name a plain dataset (``digits``), but a
    path in it is never followed — a model downloaded from anywhere must not make ``eval`` read an
    arbitrary directory. Paths are used only when the user passes them with ``--dataset``.
    """
    if given:
        return given
    stored = meta.get("dataset")
    if not isinstance(stored, str) or not stored.strip():
        raise InvalidSettingError(f"{path} does not name its dataset; pass --dataset")
    if _names_a_path(stored):
        raise InvalidSettingError(
            f"{path} names the dataset {stored!r}, which is a path; eval reads a path only when you pass it "
            f"yourself: add --dataset {shlex.quote(stored)} if you trust it, or another --dataset"
        )
    return stored


def _eval_seed(given: int | None, meta: dict[str, Any], path: str) -> int:
    if given is not None:
        return given
    stored = meta.get("seed", 0)
    if type(stored) is not int or not 0 <= stored <= MAX_SEED:
        raise CheckpointError(
            f"{path}: its description's meta.seed {stored!r} is not a dataset seed; pass --seed"
        )
    return stored


def _num_logits(model: torch.nn.Module, x: torch.Tensor, path: str) -> int:
    """How many classes ``model`` scores, from one forward pass on ``x``; it must return (batch, classes)."""
    with torch.no_grad():
        output = model(x)
    if not isinstance(output, torch.Tensor):
        raise CheckpointError(
            f"{path}: the model returns a {type(output).__name__}, not a tensor of class scores; eval scores "
            "classifiers whose forward returns (batch, classes) logits"
        )
    if output.dim() != 2 or output.shape[0] != x.shape[0]:
        raise CheckpointError(
            f"{path}: the model returns shape {list(output.shape)} for a batch of {x.shape[0]}; eval scores "
            "classifiers whose forward returns (batch, classes) logits"
        )
    return int(output.shape[1])


def _eval(args: argparse.Namespace) -> int:
    """Score a saved pruned model on the test split of its dataset."""
    from prune_env import count_macs, count_params
    from prune_env.checkpoint import load_pruned_with_spec
    from prune_env.data import load
    from prune_env.device import resolve_device
    from prune_env.train import evaluate

    device = resolve_device(args.device)  # a bad device fails before anything is loaded
    model, spec = load_pruned_with_spec(args.path)
    dataset = _eval_dataset(args.dataset, spec["meta"], args.path)
    # The split is seeded: score on the test split the model was never tuned on.
    seed = _eval_seed(args.seed, spec["meta"], args.path)
    shape = list(spec["input_shape"])
    classes = _num_logits(model, torch.zeros(1, *shape), args.path)
    if spec["num_classes"] is not None and classes != spec["num_classes"]:
        raise CheckpointError(
            f"{args.path}: the model scores {classes} classes but its description says num_classes "
            f"{spec['num_classes']}"
        )
    splits = load(dataset, seed=seed)
    data_shape = list(splits.input_shape)
    fix = "pass the --dataset the model was pruned on"
    if data_shape[0] != shape[0]:
        raise InvalidSettingError(
            f"dataset {dataset} has {data_shape[0]}-channel inputs but the model at {args.path} expects "
            f"{shape[0]}-channel inputs (input_shape {shape}); {fix}"
        )
    if data_shape != shape:  # global pooling may accept another size; a flatten -> linear head does not
        try:
            _num_logits(model, torch.zeros(1, *data_shape), args.path)
        except RuntimeError as exc:
            raise InvalidSettingError(
                f"the model at {args.path} (input_shape {shape}) cannot run on dataset {dataset}'s "
                f"{data_shape} inputs ({_first_line(exc)}); {fix}"
            ) from None
    if splits.num_classes != classes:
        raise InvalidSettingError(
            f"dataset {dataset} has {splits.num_classes} classes but the model at {args.path} scores "
            f"{classes}; {fix}"
        )
    model = model.to(device)
    metrics = evaluate(model, getattr(splits, args.split), device=device)
    x = torch.zeros(1, *shape, device=device)
    print(f"model:    {args.path} ({spec['architecture'] or 'custom'} pruned)")
    print(f"dataset:  {dataset} (seed {seed}), {args.split} split, {int(metrics['samples'])} samples")
    print(f"accuracy: {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}")
    print(f"MACs:     {count_macs(model, x):,}")
    print(f"params:   {count_params(model):,}")
    return 0


# ------------------------------------------------------------------------------------------------ export


def _claim_output(out: Path, option: str) -> Path:
    """A fresh temporary file next to ``out`` that will be renamed onto it: proof that ``out`` can be
    written, obtained before any work. ``out`` itself may be a file to replace, never a directory."""
    if out.is_dir():
        raise InvalidSettingError(
            f"{option} {out} is a directory; pass the path of the file to write, e.g. {out / 'model.onnx'}"
        )
    if os.path.lexists(out) and not out.is_file():
        raise InvalidSettingError(
            f"{option} {out} exists and is not a regular file; pass a file path to write"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a component of the path is a file
        raise InvalidSettingError(
            f"cannot write {option} {out}: a part of {out.parent} is a file, not a directory"
        ) from None
    except OSError as exc:
        raise InvalidSettingError(f"cannot write {option} {out}: {exc.strerror} ({exc.filename})") from None
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never write through a file or link someone placed at the temporary name.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise InvalidSettingError(f"cannot write {option} {out}: {exc.strerror} ({out.parent})") from None
    return tmp


def _export(args: argparse.Namespace) -> int:
    """Write a saved pruned model as ONNX."""
    import importlib.util

    from prune_env.checkpoint import load_pruned_with_spec

    if importlib.util.find_spec("onnx") is None:
        raise PruneEnvError("ONNX export needs the onnx package: pip install onnx")
    out = Path(args.onnx)
    tmp = _claim_output(out, "--onnx")
    try:
        model, spec = load_pruned_with_spec(args.path)
        x = torch.zeros(1, *spec["input_shape"])
        # The torch.export-based exporter needs onnxscript; the TorchScript one needs only onnx.
        dynamo = importlib.util.find_spec("onnxscript") is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=dynamo,
            )
        # Written under a temporary name and renamed: a reader never sees half a file, and a failed
        # export leaves any earlier file at --onnx as it was.
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the command's one-line format (``--help`` is unchanged)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prune-env: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _number_in(
    convert: Callable[[str], float], low: float, high: float, *, high_open: bool = False, what: str = ""
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` within [low, high] (or [low, high) ), NaN refused."""
    bracket = ")" if high_open else "]"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not (low <= value < high if high_open else low <= value <= high):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {what}in [{low}, {high}{bracket}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prune-env", description=__doc__.splitlines()[0])
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
    ev.add_argument(
        "--dataset",
        default=None,
        help="default: the dataset the model was pruned on (a path, e.g. imagefolder:DIR, only from here)",
    )
    ev.add_argument(
        "--seed",
        type=_number_in(int, 0, MAX_SEED, what="an integer "),
        default=None,
        help="dataset split seed (default: the run's seed)",
    )
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    ev.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a saved pruned model as ONNX (needs the onnx package)")
    export.add_argument("path", help="a saved model directory")
    export.add_argument("--onnx", required=True, help="output .onnx file (replaced if it exists)")
    export.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="prune a torchvision model and print its dependency groups")
    demo.add_argument("--model", default="resnet18")
    demo.add_argument(
        "--ratio",
        type=_number_in(float, 0, 1, high_open=True, what="a fraction "),
        default=0.5,
        help="fraction of every group's channels removed, in [0, 1) (default 0.5)",
    )
    demo.add_argument(
        "--resolution",
        type=_number_in(int, 1, MAX_DEMO_RESOLUTION, what="an integer "),
        default=64,
        help="input height and width in pixels (default 64)",
    )
    demo.set_defaults(func=_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or an argparse error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    args.argv = argv
    try:
        return int(args.func(args))
    except PruneEnvError as exc:  # the library's own verdict on the user's input: not a bug
        print(f"prune-env: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prune-env: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Anything else is a bug in prune_env (or in a library under it), not a mistake in the input:
        # show it as the crash it is rather than as "bad input".
        traceback.print_exc()
        print(
            "prune-env: internal error: this is a bug in prune_env, not a problem with your input; please "
            f"report it with the traceback above and the command `prune-env {shlex.join(argv)}`",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
