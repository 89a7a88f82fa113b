"""Pruning policies a search leaves behind: decide kept channels for any target with no evaluation.

Every channel search returns one (``SearchResult.policy``):

- the Stable-Baselines3 learners (ppo, a2c, sac, td3, ddpg, amc) an :class:`agents.sb3.SB3Policy`, which
  decides from the environment's observation — target included, so one trained over a ``budget_range``
  serves any target in it (CACP);
- SeerNet's (``predictor``) an :class:`agents.predictor.PredictorPolicy`, its trained accuracy predictor:
  for each target asked for, gradient ascent on the predicted accuracy under that target's cost barrier;
- every other agent an :class:`AllocationPolicy`, per-group ratios projected onto whatever target it is
  asked for: RL-Pruner's learned distribution (its mean), or the best allocation found (uniform, random,
  evolution). It is an allocation carried over to other budgets, not one learned per budget.

A policy is saved as a directory holding ``policy.json`` (its kind and settings) and whatever else it needs;
:func:`load_policy` reads any kind back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from prune_env.errors import InvalidSettingError
from prune_env.problem import PruningProblem

POLICY_META = "policy.json"


class Policy(Protocol):
    """What a saved or returned policy offers."""

    @property
    def budget_range(self) -> tuple[float, float] | None: ...

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray: ...

    def save(self, directory: str | Path) -> Path: ...


@dataclass(frozen=True)
class AllocationPolicy:
    """An allocation of the pruning across channel groups (per-group ratios), projected onto any target by
    the problem's own projection — no evaluation spent.

    ``agent``: who found it; ``budget_range``: the targets it was searched for (``None``: its problem's).
    """

    agent: str
    ratios: tuple[float, ...]
    budget_range: tuple[float, float] | None = None

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray:
        """Kept units per group at ``target`` (default: the problem's), within it by construction."""
        if problem.n_groups != len(self.ratios):
            raise InvalidSettingError(
                f"this {self.agent} allocation has {len(self.ratios)} ratios, the problem {problem.n_groups} "
                "channel groups: apply it to the problem (model and dataset) it was searched on"
            )
        if target is not None:  # checked here, not in keep_for: environments call that every step
            problem.check_target(target)
        return problem.keep_for(np.asarray(self.ratios, dtype=np.float64), target)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": "allocation",
            "agent": self.agent,
            "ratios": list(self.ratios),
            "budget_range": None if self.budget_range is None else list(self.budget_range),
        }
        (path / POLICY_META).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> AllocationPolicy:
        span = meta.get("budget_range")
        return cls(
            str(meta["agent"]),
            tuple(float(r) for r in meta["ratios"]),
            None if span is None else (float(span[0]), float(span[1])),
        )


def load_policy(directory: str | Path) -> Policy:
    """The policy saved in ``directory`` (by any policy's ``save``)."""
    path = Path(directory)
    try:
        meta = json.loads((path / POLICY_META).read_text())
        kind = meta.get("kind", "sb3")  # SB3 policies saved before kinds existed have none
        if kind == "allocation":
            return AllocationPolicy.from_meta(meta)
        if kind == "predictor":
            from agents.predictor import PredictorPolicy

            return PredictorPolicy.from_meta(path, meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise InvalidSettingError(
            f"{path} holds no saved policy ({type(exc).__name__}: {exc}); save one with a policy's save()"
        ) from None
    if kind != "sb3":
        raise InvalidSettingError(f"{path / POLICY_META}: unknown policy kind {kind!r}")
    from agents.sb3 import SB3Policy  # imports Stable-Baselines3: only for its own policies

    return SB3Policy.load(path)
