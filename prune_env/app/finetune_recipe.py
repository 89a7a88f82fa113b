"""The one final fine-tune every benchmark scores its policies with (the harness's and every script's), and
the resumable results file of a benchmark script made with it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prune_env.errors import InvalidSettingError
from prune_env.problem import PruningProblem
from prune_env.validation import check_settings

if TYPE_CHECKING:
    from prune_env.quantization import BitPlan


FINETUNE_RECIPE = "finetune_accuracy"
"""Marks a benchmark script's results file whose fine-tunes are :func:`finetune_accuracy`'s; files without
it were made with a script's earlier recipe (from the pruned base model), which scores a policy differently."""


def resumable_results(out: Path, args: Mapping[str, Any]) -> dict[str, Any]:
    """A benchmark script's results file to extend: ``out`` as saved, or a new one recording ``args``; a file
    made with an earlier fine-tune recipe is refused, since its rows would not compare with new ones."""
    if not out.exists():
        return {"args": dict(args), "recipe": FINETUNE_RECIPE, "rows": []}
    saved: dict[str, Any] = json.loads(out.read_text())
    if saved.get("recipe") != FINETUNE_RECIPE:
        raise SystemExit(
            f"{out} was made with this script's earlier fine-tune recipe: use another --out (--report still "
            "reads it)"
        )
    return saved


def finetune_accuracy(
    problem: PruningProblem,
    keep: np.ndarray,
    epochs: int,
    samples: int | None = None,
    seed: int = 0,
    *,
    plan: BitPlan | None = None,
    start: str = "scored",
) -> tuple[float, float]:
    """The harness's final fine-tune of one policy: (validation, test) accuracy after ``epochs`` of
    distillation from the base model on ``samples`` training examples (one fixed subset, the problem's
    seed; ``None``: all of them). Every benchmark script scores its policies here.

    Identical recipe and data for every policy (only ``seed`` differs), so differences come from the
    policies. It starts from the model as the proxy scored it (BatchNorm recalibrated, or the supernet's
    weights for the supernet proxies: the better start, measured); ``start="pruned"``: from the pruned base
    model, only to measure what the start is worth (benchmarks/finetune_start.py). ``plan``: a joint
    policy's bits; the fine-tuned model is quantized as it says (activations calibrated on the quantized
    proxy's batches) before both accuracies are measured.
    """
    from prune_env.errors import InvalidRatiosError
    from prune_env.quantization.bits import check_plan
    from prune_env.quantization.fakequant import calibration_batches, fake_quantize
    from prune_env.quantization.proxy import CALIBRATION_BATCHES
    from prune_env.train import evaluate, finetune

    check_settings({"finetune_epochs": epochs, "finetune_samples": samples, "seed": seed})
    if start not in ("scored", "pruned"):
        raise InvalidSettingError(f"start must be 'scored' (the harness's) or 'pruned', got {start!r}")
    counts = np.asarray(keep)
    fits = counts.shape == problem.units.shape and counts.dtype.kind in "iu"
    # A count below 1 or above its group's units would silently slice the ranking into another policy.
    if not (fits and np.all((counts >= 1) & (counts <= problem.units))):
        raise InvalidRatiosError(
            f"keep must hold one integer count per group, from 1 to its units {problem.units.tolist()} "
            f"(problem.keep_for(ratios) makes them), got {counts.tolist()}"
        )
    model = problem.scored_model(counts) if start == "scored" else problem.build(counts)
    if plan is not None:
        check_plan(plan, model)  # refused before the fine-tune, not after it
    tuned, metrics = finetune(
        model,
        problem.base_model,
        problem.data.with_training_subset(samples, problem.seed),
        epochs,
        seed=seed,
        progress=False,
        device=problem.device,
    )
    if plan is None:
        return float(metrics["val_accuracy"]), float(metrics["test_accuracy"])
    batches = calibration_batches(problem.data.train, CALIBRATION_BATCHES, seed=problem.seed)
    quantized = fake_quantize(tuned, plan, batches)  # the fine-tuned copy is this function's own
    val, test = (
        evaluate(quantized, s, device=problem.device)["accuracy"]
        for s in (problem.data.val, problem.data.test)
    )
    return float(val), float(test)


__all__ = ["FINETUNE_RECIPE", "finetune_accuracy", "resumable_results"]
