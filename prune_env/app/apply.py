"""``prune-env apply``: a budget-range run's policy pruned for a new target, with no new evaluation.

The run's settings (``state.json``) rebuild its problem — the same data split, base model (a cache hit),
channel rankings and proxy — at the new target; the saved policy (``RUN/policy``) decides the kept channels
from the environment's observation, within the target by construction; the model is built as the proxy
would score it (BatchNorm recalibrated on training batches), optionally fine-tuned, and saved.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from prune_env.app.job import POLICY_DIR, base_model_spec
from prune_env.app.runfiles import STATE_FILE, read_state
from prune_env.app.settings import SearchSettings
from prune_env.errors import InvalidSettingError
from prune_env.settings import ProblemSettings
from prune_env.validation import check_settings


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
    saved = read_state(run / STATE_FILE)["settings"]
    span = saved.get("budget_range")
    if span is None or not (run / POLICY_DIR).is_dir():
        raise InvalidSettingError(
            f"{run} holds no policy: only a finished `prune-env search --budget-range LO HI` saves one"
        )
    lo, hi = float(span[0]), float(span[1])
    target = float(args.target)
    if not lo <= target <= hi:
        raise InvalidSettingError(
            f"--target {target:g} lies outside the range the policy was searched for, {lo:g} to {hi:g}"
        )
    check_settings({"finetune_epochs": args.finetune_epochs}, option_style=True)
    problem_fields = {f.name for f in dataclasses.fields(ProblemSettings)}
    problem_settings = ProblemSettings(**{k: v for k, v in saved.items() if k in problem_fields})
    metric_field = "target_params" if problem_settings.metric == "params" else "target_macs"
    changes: dict[str, Any] = {metric_field: target, "progress": bool(args.progress)}
    problem_settings = dataclasses.replace(problem_settings, **changes)
    out = Path(args.out) if args.out else run / "applied" / f"{problem_settings.metric}-{target:g}"
    if out.exists():
        raise InvalidSettingError(f"{out} exists; pass another --out (nothing is overwritten)")
    s = SearchSettings(
        out=run, model=saved["model"], dataset=saved["dataset"], image_size=saved["image_size"],
        weights=saved.get("weights"), problem=problem_settings,
    )  # fmt: skip
    policy = load_policy(run / POLICY_DIR)
    splits = load(s.dataset, seed=problem_settings.seed, image_size=s.image_size)
    problem = PruningProblem(base_model_spec(s, splits), splits, problem_settings)
    keep = policy.keep_for(problem, target)
    model = problem.scored_model(keep)
    metrics = None
    if args.finetune_epochs:
        model, metrics = finetune(model, problem.base_model, splits, args.finetune_epochs, seed=problem.seed,
                                  progress=args.progress, device=problem.device)  # fmt: skip
    outcome = problem.outcome(keep, accuracy=float("nan"), loss=float("nan"))
    save_pruned(
        out, model, keep=kept_units(problem.rankings, keep, problem.group_names),
        input_shape=splits.input_shape, architecture=s.model, num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        meta={"dataset": s.dataset, "seed": problem.seed, "metric": problem.metric, "target": target,
              "policy": str(run / POLICY_DIR), "finetuned": bool(args.finetune_epochs),
              **({"test_accuracy": metrics["test_accuracy"]} if metrics else {})},
    )  # fmt: skip
    tested = f", test accuracy {metrics['test_accuracy']:.4f}" if metrics else ""
    print(
        f"{problem.metric} ratio {outcome.cost_ratio:.3f} (target {target:g}), params ratio "
        f"{outcome.params_ratio:.3f}, no evaluation spent{tested}; saved to {out}"
    )
    return 0
