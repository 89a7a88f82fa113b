"""The final model of a latency budget, after the search and before its fine-tune: held to the target by
measurement when the problem asks for it (``latency_guard``, :mod:`prune_env.latency.guard`), and measured
beside the table's prediction either way, for its results. Shared by a search run and a benchmark grid."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch import nn

from prune_env.latency.guard import LatencyFit
from prune_env.problem import PruningProblem

# The search job's logger: a run's log file and console handlers are attached to it, so these lines land there.
log = logging.getLogger("prune_env.job")


def guarded_keep(problem: PruningProblem, keep: np.ndarray) -> tuple[np.ndarray, LatencyFit | None]:
    """``keep``, or the policy the latency guard re-projected it to; the guard's fit (``None`` when the
    problem has no latency budget or no guard)."""
    if problem.metric != "latency" or not problem.settings.latency_guard:
        return keep, None
    fit = problem.fit_latency(keep)
    log.info(
        "latency guard: measured %s of the base latency after %d re-projection(s) onto %s (target %g, "
        "tolerance %.1f%%)%s",
        ", ".join(f"{r:.3f}" for r in fit.measured_ratios),
        fit.steps,
        ", ".join(f"{b:.3f}" for b in fit.budgets),
        fit.target,
        100 * fit.tolerance,
        "" if fit.within else f" -- still above the target ({fit.stopped}): measure on a quiet machine",
    )
    return fit.keep, fit


def latency_fields(
    problem: PruningProblem, keep: np.ndarray, model: nn.Module, fit: LatencyFit | None
) -> dict[str, Any]:
    """The final model's latency fields for its results (booleans as 0/1, as CSV cells): the guard's,
    whose last measurement is of this architecture (its weights do not set its speed), or else ``model``
    (``problem``'s base model pruned to ``keep``) measured now beside the base model."""
    if fit is None:
        check = problem.check_latency(keep, model)
        fields: dict[str, Any] = dict(check.fields())
        log.info(
            "measured latency %.4g ms (predicted %.4g, %+.1f%%; base %.4g ms, %.2fx faster)%s",
            check.measured.median_ms,
            check.predicted_ms,
            100 * check.error,
            check.base_measured.median_ms,
            check.speedup,
            " -- disturbed by other work on the machine: measure again when it is quiet"
            if fields["latency_measured_noisy"]
            else "",
        )
    else:
        fields = fit.fields()
    return {k: int(v) if isinstance(v, bool) else v for k, v in fields.items()}


__all__ = ["guarded_keep", "latency_fields"]
