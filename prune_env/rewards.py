"""Rewards: any callable ``Outcome -> float``; presets by name.

An :class:`Outcome` describes one evaluated pruning policy. A reward may also opt into per-step shaping in
the layer-wise environment by defining ``shape(step: StepInfo) -> float``; the presets do not (AMC gives
the whole reward at the end of the episode).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from prune_env.errors import RewardError, UnknownNameError


@dataclass(frozen=True)
class Outcome:
    """What one pruning policy achieved, as measured by the proxy (validation data only)."""

    accuracy: float
    loss: float
    base_accuracy: float
    base_loss: float
    macs: int
    params: int
    base_macs: int
    base_params: int
    target: float  # fraction of the base cost allowed
    metric: str  # what ``target`` constrains: "macs", "params", "bitops", "size" or "latency"
    ratios: np.ndarray = field(repr=False)  # fraction of each group's channels removed
    keep: tuple[int, ...] = field(repr=False, default=())
    eval_seconds: float = 0.0
    memo_hit: bool = False
    # Joint policies (pruning + quantization) only: bits per group, and BitOps and size in bits of the
    # model and of the unpruned one at 32 bits (all 0 / empty otherwise).
    weight_bits: tuple[int, ...] = field(repr=False, default=())
    activation_bits: tuple[int, ...] = field(repr=False, default=())
    bitops: int = 0
    size_bits: int = 0
    base_bitops: int = 0
    base_size_bits: int = 0
    # A latency budget only: the predicted latency (ms) of the model and of the unpruned one (0 otherwise).
    latency_ms: float = 0.0
    base_latency_ms: float = 0.0

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.base_macs

    @property
    def params_ratio(self) -> float:
        return self.params / self.base_params

    @property
    def bitops_ratio(self) -> float:
        """BitOps as a fraction of the unpruned model's at 32 bits (nan for a policy without bits)."""
        return self.bitops / self.base_bitops if self.base_bitops else math.nan

    @property
    def size_ratio(self) -> float:
        """Size as a fraction of the unpruned model's at 32 bits (nan for a policy without bits)."""
        return self.size_bits / self.base_size_bits if self.base_size_bits else math.nan

    @property
    def latency_ratio(self) -> float:
        """Predicted latency as a fraction of the unpruned model's (nan without a latency budget)."""
        return self.latency_ms / self.base_latency_ms if self.base_latency_ms else math.nan

    def latency_fields(self) -> dict[str, float]:
        """The predicted latency's fields for a run's results (none without a latency budget)."""
        if not self.base_latency_ms:
            return {}
        return {
            "latency_ms": self.latency_ms,
            "base_latency_ms": self.base_latency_ms,
            "latency_ratio": self.latency_ratio,
        }

    @property
    def cost_ratio(self) -> float:
        """The constrained cost as a fraction of the base model's."""
        return float(getattr(self, f"{self.metric}_ratio"))

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy

    def as_info(self) -> dict[str, Any]:
        """Flat, mostly scalar keys for ``info`` (SB3's Monitor can log them).

        Deterministic by design: no timings or cache state, so equal seeds and actions give equal infos.
        """
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "base_accuracy": self.base_accuracy,
            "macs_ratio": self.macs_ratio,
            "params_ratio": self.params_ratio,
            "macs": self.macs,
            "params": self.params,
            "target": self.target,
            "ratios": np.asarray(self.ratios, dtype=np.float64),
            **(
                {
                    "bitops_ratio": self.bitops_ratio,
                    "size_ratio": self.size_ratio,
                    "weight_bits": np.asarray(self.weight_bits, dtype=np.int64),
                    "activation_bits": np.asarray(self.activation_bits, dtype=np.int64),
                }
                if self.weight_bits
                else {}
            ),
            **(
                {"latency_ratio": self.latency_ratio, "latency_ms": self.latency_ms}
                if self.base_latency_ms
                else {}
            ),
        }


@dataclass(frozen=True)
class StepInfo:
    """What the layer-wise environment knows after deciding one group (for reward shaping)."""

    group: int
    ratio: float
    cost_ratio_so_far: float
    target: float


@runtime_checkable
class Reward(Protocol):
    def __call__(self, outcome: Outcome) -> float: ...


RewardFn = Callable[[Outcome], float]


@dataclass(frozen=True)
class Accuracy:
    """AMC's accuracy-guided reward: the proxy accuracy (the budget is enforced by the action wall)."""

    def __call__(self, outcome: Outcome) -> float:
        return float(outcome.accuracy)


@dataclass(frozen=True)
class AccuracyLogMacs:
    """AMC's ``-error · log(MACs)``: rewards lower error and, weakly, fewer MACs."""

    def __call__(self, outcome: Outcome) -> float:
        return float(-outcome.error * math.log(max(outcome.macs, 1)))


@dataclass(frozen=True)
class Mnas:
    """MnasNet's soft constraint: ``accuracy · (cost / target)^w`` with ``w < 0``."""

    w: float = -0.07

    def __call__(self, outcome: Outcome) -> float:
        return float(outcome.accuracy * (outcome.cost_ratio / outcome.target) ** self.w)


@dataclass(frozen=True)
class Hard:
    """Accuracy, minus ``penalty`` per unit of relative overshoot when the cost exceeds the target."""

    penalty: float = 10.0

    def __call__(self, outcome: Outcome) -> float:
        over = max(0.0, outcome.cost_ratio - outcome.target) / outcome.target
        return float(outcome.accuracy - self.penalty * over)


@dataclass(frozen=True)
class Lagrangian:
    """``accuracy - λ · (cost_ratio - target)``: pays for every bit of budget used, rewards savings."""

    lam: float = 1.0

    def __call__(self, outcome: Outcome) -> float:
        return float(outcome.accuracy - self.lam * (outcome.cost_ratio - outcome.target))


PRESETS: dict[str, Callable[[], RewardFn]] = {
    "acc": Accuracy,
    "acc_log_macs": AccuracyLogMacs,
    "mnas": Mnas,
    "hard": Hard,
    "lagrangian": Lagrangian,
}


def get_reward(reward: str | RewardFn) -> RewardFn:
    """A preset by name, or the callable itself."""
    if callable(reward):
        return reward
    if isinstance(reward, str) and reward in PRESETS:
        return PRESETS[reward]()
    raise UnknownNameError(f"unknown reward {reward!r}; presets: {', '.join(PRESETS)} (or pass a callable)")


def checked_reward(value: Any, source: Callable[..., Any]) -> float:
    """``value`` as a float if it is a finite real number (Python, numpy or a one-element tensor).

    A string, a bool, None, a complex number or NaN/inf from a user's reward or shaping function raises
    :class:`RewardError` naming the function: never converted, never passed on to an agent.
    """
    if (isinstance(value, np.ndarray) and value.shape == ()) or (
        hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1
    ):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise RewardError(
            f"reward function {source!r} returned {value!r} ({type(value).__name__}); it must return a "
            "finite real number"
        )
    result = float(value)
    if not math.isfinite(result):
        raise RewardError(f"reward function {source!r} returned {result}; it must return a finite number")
    return result


def evaluate_reward(reward: RewardFn, outcome: Outcome) -> float:
    """Call ``reward`` and insist on a finite real number, naming the reward when it is not."""
    return checked_reward(reward(outcome), reward)
