"""``prune-env apply``: a budget-range run's policy pruned for a new target, with no new evaluation.

The run's settings (``state.json``) rebuild its problem — the same data split, base model (a cache hit),
channel rankings and proxy — at the new target; the saved policy (``RUN/policy``) decides the kept channels
from the environment's observation, within the target by construction; the model is built as the proxy
would score it (BatchNorm recalibrated on training batches), optionally fine-tuned, and saved.

Everything that can be checked is checked before any work: the state file's settings (each named with the
file when it is missing or wrong), the target against the run's range, and the output directory (see
:mod:`prune_env.app.outputs`). ``--out`` then belongs to this process until the model is saved: a second
``apply`` (or anything else taking its lock) to the same ``--out`` is refused at once, ``--force`` or not.
The model is written into a fresh directory beside ``--out`` and renamed onto it, so what another process
put there meanwhile is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prune_env.app.job import POLICY_DIR
from prune_env.app.outputs import check_directory_output, owning, publish_directory, staging_directory
from prune_env.app.runfiles import STATE_FILE, cost_ratios, read_state
from prune_env.app.settings import RESUMABLE_PROBLEM_SETTINGS, SearchSettings
from prune_env.app.weights import base_model_spec
from prune_env.data import check_dataset_name
from prune_env.errors import InvalidSettingError, PruneEnvError, RunDirectoryError, UnknownNameError
from prune_env.models import check_model_name
from prune_env.settings import ProblemSettings
from prune_env.validation import check_settings

# The settings apply rebuilds the problem from: the run's own, and every field of its problem's settings
# a state file records (all but where it runs, its bars and how its final latency is measured).
RUN_KEYS = ("model", "dataset", "image_size", "weights", "budget_range")
PROBLEM_KEYS = tuple(
    f.name for f in dataclasses.fields(ProblemSettings) if f.name not in RESUMABLE_PROBLEM_SETTINGS
)


def _non_empty_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def run_settings(run: Path) -> tuple[SearchSettings, tuple[float, float]]:
    """The settings of the run in ``run`` and its policy's budget range, each value checked; a missing,
    mistyped or out-of-range one is refused naming the state file and the key."""
    path = run / STATE_FILE
    saved = read_state(path)["settings"]

    def refuse(problem: str) -> RunDirectoryError:
        return RunDirectoryError(
            f"{path}: {problem}; the file is damaged or was edited: restore it, or search again"
        )

    missing = [k for k in (*RUN_KEYS, *PROBLEM_KEYS) if k not in saved]
    if missing:
        raise refuse(f"the settings lack {', '.join(missing)}")
    if saved["budget_range"] is None:
        raise InvalidSettingError(
            f"{run} holds no policy: only a finished `prune-env search --budget-range LO HI` saves one"
        )
    for key in ("model", "dataset"):
        if not _non_empty_text(saved[key]):
            raise refuse(f"in its settings, {key} must be a name, got {saved[key]!r}")
    if saved["weights"] is not None and not _non_empty_text(saved["weights"]):
        raise refuse(f"in its settings, weights must be a file path or null, got {saved['weights']!r}")
    try:  # names a later version may have dropped, or an edit misspelled
        check_model_name(saved["model"])
        check_dataset_name(saved["dataset"])
    except UnknownNameError as exc:
        raise refuse(f"in its settings, {exc.args[0]}") from None
    try:
        checked = check_settings({"image_size": saved["image_size"], "budget_range": saved["budget_range"]})
        problem = ProblemSettings(**{k: saved[k] for k in PROBLEM_KEYS})
        settings = SearchSettings(
            out=run, model=saved["model"], dataset=saved["dataset"], image_size=checked["image_size"],
            weights=saved["weights"], problem=problem,
        )  # fmt: skip
    except PruneEnvError as exc:  # the rules name the key; the file is what the user must look at
        raise refuse(f"in its settings, {exc}") from None
    except TypeError as exc:  # a value of a type no rule expects (a list for a name, a dict for a path)
        raise refuse(f"in its settings, {' '.join(str(exc).split())}") from None
    return settings, checked["budget_range"]


def _problem_settings(saved: ProblemSettings, target: float, progress: bool) -> ProblemSettings:
    changes: Mapping[str, Any] = {f"target_{saved.metric}": target, "progress": progress}
    return dataclasses.replace(saved, **changes)


def run_apply(args: argparse.Namespace) -> int:
    from agents.policies import load_policy
    from prune_env.checkpoint import kept_units, save_pruned
    from prune_env.data import load
    from prune_env.problem import PruningProblem
    from prune_env.train import finetune

    run = Path(args.run)
    if not (run / STATE_FILE).is_file():
        raise InvalidSettingError(
            f"{run} is not a run directory (it has no {STATE_FILE}); pass a search's --out"
        )
    saved, (lo, hi) = run_settings(run)
    if not (run / POLICY_DIR).is_dir():
        raise InvalidSettingError(
            f"{run} holds no policy: only a finished `prune-env search --budget-range LO HI` saves one"
        )
    target = float(args.target)
    if not lo <= target <= hi:
        raise InvalidSettingError(
            f"--target {target:g} lies outside the range the policy was searched for, {lo:g} to {hi:g}"
        )
    check_settings({"finetune_epochs": args.finetune_epochs}, option_style=True)
    problem_settings = _problem_settings(saved.problem, target, bool(args.progress))
    s = dataclasses.replace(saved, problem=problem_settings)
    out = check_directory_output(
        args.out if args.out is not None else run / "applied" / f"{problem_settings.metric}-{target:g}",
        "--out",
        force=args.force,
    )
    with (
        owning([(out, "--out")], lambda: check_directory_output(out, "--out", force=args.force)) as seen,
        staging_directory(out) as stage,
    ):
        policy = load_policy(run / POLICY_DIR)
        splits = load(s.dataset, seed=problem_settings.seed, image_size=s.image_size)
        problem = PruningProblem(base_model_spec(s, splits), splits, problem_settings)
        keep = policy.keep_for(problem, target)
        model = problem.scored_model(keep)
        metrics = None
        if args.finetune_epochs > 0:
            model, metrics = finetune(model, problem.base_model, splits, args.finetune_epochs, seed=problem.seed,
                                      progress=args.progress, device=problem.device)  # fmt: skip
        outcome = problem.outcome(keep, accuracy=float("nan"), loss=float("nan"))
        save_pruned(
            stage, model, keep=kept_units(problem.rankings, keep, problem.group_names),
            input_shape=splits.input_shape, architecture=s.model, num_classes=splits.num_classes,
            in_channels=splits.in_channels,
            meta={"dataset": s.dataset, "seed": problem.seed, "metric": problem.metric, "target": target,
                  "policy": str(run / POLICY_DIR), "finetuned": metrics is not None,
                  **({"test_accuracy": metrics["test_accuracy"]} if metrics else {})},
        )  # fmt: skip
        publish_directory(stage, out, force=args.force, option="--out", seen=seen[out])
        # Said while --out is still this process's: no other apply can have replaced it yet.
        tested = f", test accuracy {metrics['test_accuracy']:.4f}" if metrics else ""
        print(
            f"{cost_ratios(problem.metric, outcome.cost_ratio, outcome.params_ratio)} (target {target:g}), "
            f"no evaluation spent{tested}; saved to {out}"
        )
    return 0
