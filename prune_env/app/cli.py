"""The ``prune-env`` command line: search, list, eval, export, apply, latency, demo.

Errors the user can fix — an unknown name, an impossible target, a bad option, a missing or tampered saved
model — are the library's typed errors (:class:`~prune_env.errors.PruneEnvError`) and argparse's own: each
is reported in one line, ``prune-env: error: ...``, with exit status 2 and no traceback. Anything else is a
bug in prune_env, not the user's mistake: it is shown as a crash (the traceback and a line asking to report
it, exit status 1). Ctrl-C exits with 130.

The options of ``search`` are generated from the fields of its settings (:mod:`prune_env.app.settings`).
Help and argument errors answer before torch is imported: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from prune_env.app.settings import add_options, add_settings_options, from_options
from prune_env.errors import PruneEnvError
from prune_env.latency.settings import LatencySettings
from prune_env.validation import MAX_SEED

# Largest --resolution of `demo`: beyond it one activation of a torchvision model no longer fits in memory.
MAX_DEMO_RESOLUTION = 2048


def _search(args: argparse.Namespace) -> int:
    """Train or load the base model, search, fine-tune the best policy with KD, save everything."""
    # Settings first: they are refused (a Ray address that does not answer included) before torch loads.
    settings = from_options(args, tuple(args.argv))
    from prune_env.app.job import run_search

    return run_search(settings)


def _list(args: argparse.Namespace) -> int:
    """Print the names every other subcommand accepts."""
    # Names only, none of the modules they name: torch and Stable-Baselines3 would take seconds to import.
    from prune_env.app.agent_catalog import runnable_agents
    from prune_env.app.settings import DEFAULT_AGENTS
    from prune_env.names import DATASET_NAMES, ZOO_MODELS
    from prune_env.rewards import PRESETS

    agents = runnable_agents()
    default = next((a for a in DEFAULT_AGENTS if a in agents), None)
    print("models:   " + ", ".join(ZOO_MODELS) + ", tv:NAME (any torchvision classifier)")
    print("datasets: " + ", ".join(DATASET_NAMES))
    print("agents:   " + ", ".join(a + (" (default)" if a == default else "") for a in agents))
    print("rewards:  " + ", ".join(PRESETS))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from prune_env.app.model_commands import run_eval

    return run_eval(args)


def _export(args: argparse.Namespace) -> int:
    from prune_env.app.model_commands import run_export

    return run_export(args)


def _apply(args: argparse.Namespace) -> int:
    from prune_env.app.apply import run_apply

    return run_apply(args)


def _latency(args: argparse.Namespace) -> int:
    from prune_env.app.latency_command import run_latency

    return run_latency(args)


def _demo(args: argparse.Namespace) -> int:
    from prune_env.app.model_commands import run_demo

    return run_demo(args)


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
    _add_search_command(sub)
    _add_list_command(sub)
    _add_eval_command(sub)
    _add_export_command(sub)
    _add_apply_command(sub)
    _add_latency_command(sub)
    _add_demo_command(sub)
    return parser


def _add_search_command(sub: Any) -> None:
    search = sub.add_parser(
        "search",
        help="search a pruning policy, fine-tune the result, save model and results",
        description="Train or load the base model, search pruning policies under a cost budget, fine-tune "
        "the best policy's model with knowledge distillation and save everything under --out.",
    )
    add_options(search)
    search.set_defaults(func=_search)


def _add_list_command(sub: Any) -> None:
    lister = sub.add_parser("list", help="name the models, datasets, agents and reward presets")
    lister.set_defaults(func=_list)


def _add_eval_command(sub: Any) -> None:
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


def _add_export_command(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="write a saved pruned model as ONNX (needs onnx, onnxruntime) and/or TorchScript, each checked "
        "against PyTorch's outputs",
    )
    export.add_argument("path", help="a saved model directory")
    export.add_argument("--onnx", default=None, help="output .onnx file")
    export.add_argument("--torchscript", default=None, help="output TorchScript .pt file")
    export.add_argument(
        "--force", action="store_true", help="replace output files that exist (default: refuse them)"
    )
    export.set_defaults(func=_export)


def _add_apply_command(sub: Any) -> None:
    apply = sub.add_parser(
        "apply",
        help="prune for a new target with the policy a --budget-range search learned (no new evaluation)",
    )
    apply.add_argument("run", help="the run directory of a finished --budget-range search")
    apply.add_argument("--target", type=float, required=True, help="the new budget, in the run's metric")
    apply.add_argument("--out", default=None, help="directory for the model (default RUN/applied/METRIC-T)")
    apply.add_argument("--finetune-epochs", type=int, default=0, help="KD fine-tune epochs (default 0)")
    apply.add_argument(
        "--force",
        action="store_true",
        help="replace a saved model at --out (default: refuse it; a directory holding anything else is never "
        "replaced)",
    )
    apply.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    apply.set_defaults(func=_apply)


def _add_latency_command(sub: Any) -> None:
    latency = sub.add_parser(
        "latency",
        help="measure a model's per-layer latency table (or load it from the cache), print and plot it",
        description="Measure each prunable layer alone at a grid of widths and the whole model, on this "
        "machine, at a batch and thread count; print predicted latency against MACs per group and write "
        "latency.json and latency.png into --out.",
    )
    latency.add_argument("model", help="a model name (see `prune-env list`)")
    latency.add_argument("--dataset", default="digits", help="whose input shape to time (default digits)")
    add_settings_options(latency.add_argument_group("measurement settings"), LatencySettings)
    latency.add_argument("--out", default=None, help="output directory (default latency-MODEL)")
    latency.add_argument(
        "--force", action="store_true", help="replace an earlier latency output in --out (nothing else)"
    )
    latency.add_argument("--refresh", action="store_true", help="measure anew even if a table is cached")
    latency.set_defaults(func=_latency)


def _add_demo_command(sub: Any) -> None:
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
