"""Holding a latency budget to measurement: the table predicts, the machine decides.

A search prices every policy by the table and prefers, among policies of equal predicted latency, those the
table under-prices: measured alone on MobileNetV2/2 at 40% of its latency (Fashion-MNIST, batch 32), the
policies a knapsack and PPO chose ran 8-14% above the target while uniform pruning ran on it. So the chosen
policy is measured before it is fine-tuned, against the unpruned model right after it; while it runs above
the target by more than the protocol's noise (the table's spread of repeated whole-model medians, below
which two measurements of one model do not differ), the predicted budget is lowered by the measured
overshoot (its predicted fraction times ``target / measured``) and the policy is projected onto the lower budget -- its ratios
pushed toward ``max_ratio`` in proportion to their room, so its preferences survive -- and measured again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prune_env.latency.budget import LatencyCheck

# Re-projections at most: each divides the predicted budget by the measured overshoot, which is close to
# proportional, so one step usually lands within the noise and a third is a sign of noise, not of the table.
MAX_STEPS = 3


@dataclass(frozen=True)
class LatencyFit:
    """A policy held to its latency target by measurement.

    Attributes:
        keep: the kept counts of the final policy (the chosen one when it measured within the target).
        check: the final policy's measurement beside its prediction.
        target: the latency target (a fraction of the unpruned model's latency).
        tolerance: how far above the target a measurement may lie and still meet it (the protocol's noise).
        budgets: the predicted budget each measured policy was projected onto (the first is the target).
        measured_ratios: the measured ratio of each of those policies.
        stopped: why fitting ended: ``"within"`` (the last one met the target), ``"floor"`` (the
            projection could not go lower), ``"steps"`` (it took :data:`MAX_STEPS` re-projections),
            ``"disturbed"`` (a measurement stayed noisier than the protocol allows: not acted on).
    """

    keep: np.ndarray
    check: LatencyCheck
    target: float
    tolerance: float
    budgets: tuple[float, ...]
    measured_ratios: tuple[float, ...]
    stopped: str

    @property
    def steps(self) -> int:
        """Re-projections made (0: the chosen policy met the target as it was)."""
        return len(self.budgets) - 1

    @property
    def within(self) -> bool:
        """Whether the final policy measured within the target's tolerance."""
        return self.stopped == "within"

    def fields(self) -> dict[str, float | int | bool | str]:
        """Flat fields for a run's results: the final measurement's, then the fitting's."""
        return {
            **self.check.fields(),
            "latency_guard_steps": self.steps,
            "latency_guard_within": self.within,
            "latency_guard_stopped": self.stopped,
            "latency_guard_tolerance": self.tolerance,
            "latency_guard_budgets": " ".join(f"{b:.6g}" for b in self.budgets),
            "latency_guard_measured_ratios": " ".join(f"{r:.6g}" for r in self.measured_ratios),
        }


def fit_to_measurement(
    keep: np.ndarray,
    target: float,
    tolerance: float,
    measure: Callable[[np.ndarray], LatencyCheck],
    project: Callable[[np.ndarray, float], np.ndarray],
    floor: float,
    full_ms: float,
) -> LatencyFit:
    """Measure ``keep`` and re-project it onto lower predicted budgets until it measures within
    ``target * (1 + tolerance)`` (module docstring).

    Args:
        keep: the chosen policy's kept counts (its predicted latency meets ``target``).
        target: the latency target, a fraction of the unpruned model's latency.
        tolerance: the relative overshoot a measurement may have and still meet the target (>= 0).
        measure: measures a policy's model against the unpruned one.
        project: the kept counts of a policy projected onto a predicted budget (a fraction).
        floor: the smallest predicted fraction the projection reaches.
        full_ms: the unpruned model's predicted milliseconds (what predicted fractions are of).
    """
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive fraction, got {target!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite fraction >= 0, got {tolerance!r}")
    keep = np.asarray(keep, dtype=np.int64).copy()
    budgets, ratios = [target], []
    check = measure(keep)
    while True:
        ratios.append(check.measured_ratio)
        if check.measured_ratio <= target * (1 + tolerance):
            stopped = "within"
            break
        if check.measured.noisy or check.base_measured.noisy:
            # Measured while something else ran: the overshoot may be the other work's, not the model's.
            stopped = "disturbed"
            break
        if len(budgets) > MAX_STEPS:
            stopped = "steps"
            break
        # Were the table's error proportional, a policy predicted at this fraction would measure the target.
        lower = max(check.predicted_ms / full_ms * target / check.measured_ratio, floor)
        tighter = project(keep, lower)
        if lower >= budgets[-1] or np.array_equal(tighter, keep):
            stopped = "floor"
            break
        keep = tighter
        budgets.append(lower)
        check = measure(keep)
    return LatencyFit(keep, check, target, tolerance, tuple(budgets), tuple(ratios), stopped)


__all__ = ["MAX_STEPS", "LatencyFit", "fit_to_measurement"]
