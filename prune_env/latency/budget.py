"""Latency as a budget: a :class:`LatencyModel` as the cost a :class:`~prune_env.budget.BudgetProjector`
projects onto, and the latency model a pruning problem is built with.

The budget is a fraction of the unpruned model's latency as its table predicts it, which at full width is
the measured whole-model latency by construction (:mod:`prune_env.latency.table`). Predictions are not
bilinear in the kept counts, and not even monotone (a width the kernels like may run faster than a
narrower one), so the projector prices candidates with batched predictions and checks every answer with
the exact prediction; see :class:`~prune_env.budget.BudgetProjector`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.budget import BudgetProjector
from prune_env.errors import InvalidSettingError
from prune_env.graph import DependencyGraph
from prune_env.latency.cost import LatencyModel, latency_model
from prune_env.latency.measure import Timing, measure_module
from prune_env.latency.settings import LatencySettings, available_cores
from prune_env.settings import ProblemSettings
from prune_env.validation import check_settings


@dataclass(frozen=True)
class LatencyCheck:
    """A pruned model's predicted latency beside its measured one, and the unpruned model's measured beside
    it (the same protocol, one after the other: the speed-up is the machine's, now).

    Attributes:
        predicted_ms: the table's prediction for the pruned model's kept counts.
        measured: the pruned model's measurement (median, spread, whether it was disturbed).
        base_measured: the unpruned model's measurement.
        round_ratios: measured pruned / unpruned latency of every round, sorted, when the pair was measured
            several times (this check is the median round's); ``()`` for a single round.
    """

    predicted_ms: float
    measured: Timing
    base_measured: Timing
    round_ratios: tuple[float, ...] = ()

    @property
    def error(self) -> float:
        """(predicted - measured) / measured: positive when the table over-predicts."""
        return (self.predicted_ms - self.measured.median_ms) / self.measured.median_ms

    @property
    def speedup(self) -> float:
        """Measured unpruned latency / measured pruned latency."""
        return self.base_measured.median_ms / self.measured.median_ms

    @property
    def measured_ratio(self) -> float:
        """Measured pruned latency / measured unpruned latency: what a latency target is a fraction of."""
        return self.measured.median_ms / self.base_measured.median_ms

    def fields(self) -> dict[str, float | int | bool]:
        """Flat fields for a run's results (JSON and CSV)."""
        return {
            "latency_predicted_ms": self.predicted_ms,
            "latency_measured_ms": self.measured.median_ms,
            "latency_measured_iqr_ms": self.measured.iqr_ms,
            "latency_measured_repeats": self.measured.repeats,
            "latency_measured_noisy": self.measured.noisy or self.base_measured.noisy,
            "base_latency_measured_ms": self.base_measured.median_ms,
            "latency_prediction_error": self.error,
            "measured_speedup": self.speedup,
            "latency_measured_rounds": max(1, len(self.round_ratios)),
        }


class LatencyCost:
    """A :class:`LatencyModel` as a budget's cost (:class:`~prune_env.budget.PredictedCost`): predicted
    milliseconds of keep vectors, a refusal's wording of the smallest reachable latency, and the check of a
    prediction against a measurement by the protocol the table was measured with.

    Args:
        model: the latency model (table and graph).
        settings: the protocol the table was measured with (default: the table's batch, threads and device
            with the default protocol), used again to measure pruned models.
    """

    def __init__(self, model: LatencyModel, settings: LatencySettings | None = None) -> None:
        if not isinstance(model, LatencyModel):
            raise InvalidSettingError(
                f"LatencyCost prices a budget with a LatencyModel, got {type(model).__name__}: pass the "
                "model prune_env.latency.latency_model returns"
            )
        meta = model.table.meta
        if settings is None:
            settings = LatencySettings(
                batch=meta.batch, threads=meta.threads, device=meta.device, progress=False
            )
        elif (settings.batch, settings.threads, settings.device) != (meta.batch, meta.threads, meta.device):
            raise InvalidSettingError(
                f"settings measure at batch {settings.batch}, {settings.threads} thread(s) on {settings.device}; "
                f"the table was measured at batch {meta.batch}, {meta.threads} thread(s) on {meta.device}: pass "
                "the settings the table was measured with"
            )
        self.model = model
        self.settings = settings

    def __repr__(self) -> str:
        return f"LatencyCost({self.model!r})"

    @property
    def full_ms(self) -> float:
        """The unpruned model's predicted (= measured) latency."""
        return self.model.full_ms

    @property
    def overhead_ms(self) -> float:
        """The part of the table's residual no pruning removes (per-operation dispatch; see
        :mod:`prune_env.latency.table`), never below zero."""
        return max(0.0, float(self.model.table.constant_ms))

    def predict(self, keep: Any) -> Any:
        return self.model.predict(keep)

    def check(
        self,
        keep: np.ndarray,
        pruned: nn.Module,
        base: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        rounds: int = 1,
    ) -> LatencyCheck:
        """Measure ``pruned`` (the base model pruned to ``keep``) and ``base`` right after it by the table's
        protocol, ``rounds`` times, and set the round of median ratio beside the prediction for ``keep``
        (of an even count, the lower of the middle two). Neither model is changed (a copy is moved or put
        in eval mode when needed)."""
        rounds = check_settings({"latency_rounds": rounds})["latency_rounds"]
        predicted = float(self.model.predict(np.asarray(keep)))
        checks = sorted(
            (
                LatencyCheck(
                    predicted,
                    measure_module(pruned, example_inputs, self.settings),
                    measure_module(base, example_inputs, self.settings),
                )
                for _ in range(rounds)
            ),
            key=lambda c: c.measured_ratio,
        )
        median = checks[(rounds - 1) // 2]
        if rounds == 1:
            return median
        return replace(median, round_ratios=tuple(c.measured_ratio for c in checks))

    def describe_floor(self, keep: np.ndarray, target: float) -> str:
        """`` (2.1 ms of the unpruned 4.3 ms at batch 1; ...)``: the milliseconds of the smallest reachable
        latency ``keep``, and whether the per-layer overhead is what stops it going lower."""
        floor_ms, full = float(self.model.predict(np.asarray(keep))), self.full_ms
        batch = self.model.table.meta.batch
        text = f" ({floor_ms:.4g} ms of the unpruned {full:.4g} ms at batch {batch}"
        overhead = self.overhead_ms
        if overhead > 0 and overhead >= target * full:
            text += (
                f"; the per-layer overhead, {overhead:.4g} ms ({overhead / full:.3g} of it) that no pruning "
                "removes, is the floor: measure at a larger latency_batch, where it weighs less"
            )
        elif overhead > 0:
            # The rest of the floor is the timed layers at their narrowest: small layers cost a call each
            # however few channels they keep, which is also why a larger batch may not lower the floor.
            text += (
                f", of which {overhead:.4g} ms is per-layer overhead that no pruning removes and "
                f"{floor_ms - overhead:.4g} ms the timed layers at their narrowest"
            )
            if overhead >= 0.5 * floor_ms:  # what pruning can still remove is the smaller part
                text += ": the overhead is most of the floor; at a larger latency_batch it weighs less"
        return text + ")"


def problem_latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    graph: DependencyGraph,
    *,
    batch: int,
    threads: int,
    device: torch.device | str,
    progress: bool,
) -> LatencyCost:
    """The latency cost of a problem's base model: its table from the cache (measured once on this machine
    at ``batch`` and ``threads`` when absent), on the problem's example input and graph."""
    cores = available_cores()
    if threads > cores:  # LatencySettings refuses it too, but names its own field, not the problem's
        raise InvalidSettingError(
            f"latency_threads={threads} is more than the {cores} CPU{'s' if cores != 1 else ''} this process "
            f"may run on (more threads than cores time the scheduler): pass 1 to {cores}"
        )
    settings = LatencySettings(batch=batch, threads=threads, device=str(device), progress=progress)
    return LatencyCost(latency_model(model, example_inputs, settings, graph=graph), settings)


def settings_projector(
    settings: ProblemSettings,
    model: nn.Module,
    example_inputs: torch.Tensor,
    graph: DependencyGraph,
    device: torch.device | str,
) -> BudgetProjector:
    """The pruning-only projector ``settings`` ask for on ``model``: of its latency (the table at the
    settings' batch and threads, :func:`problem_latency`) for a latency budget, of its parameters for a
    parameter budget, else of its MACs (a BitOps or size budget is the joint projector's)."""
    predicted = None
    if settings.metric == "latency":
        predicted = problem_latency(
            model,
            example_inputs,
            graph,
            batch=settings.latency_batch,
            threads=settings.latency_threads,
            device=device,
            progress=settings.progress,
        )
    return BudgetProjector(
        graph.costs,
        [g.units for g in graph.groups],
        metric=settings.metric if settings.metric in ("params", "latency") else "macs",
        max_ratio=settings.max_ratio,
        round_to=settings.round_to,
        names=[g.name for g in graph.groups],
        predicted=predicted,
    )


__all__ = ["LatencyCheck", "LatencyCost", "problem_latency", "settings_projector"]
