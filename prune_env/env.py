"""Gymnasium environments for structured pruning (RL glue only: pruning logic lives elsewhere)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from prune_env.actions import action_to_ratio
from prune_env.data import DataSource
from prune_env.errors import InvalidSettingError
from prune_env.models import ModelSpec
from prune_env.observation import (
    DYNAMIC_FEATURES,
    JOINT_FEATURES,
    sensitivity,
    static_features,
)
from prune_env.problem import PruningProblem
from prune_env.quantization.bits import FULL_PRECISION
from prune_env.rewards import Outcome, RewardFn, StepInfo, checked_reward, evaluate_reward, get_reward
from prune_env.settings import ProblemSettings
from prune_env.validation import check_settings, fraction


class _PruneEnv(gym.Env[np.ndarray, np.ndarray]):
    """Shared construction, budget sampling, rewards and rendering of the two environments."""

    # Gymnasium declares ``metadata`` an instance attribute; a class default is how envs set it.
    metadata: dict[str, Any] = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        model: ModelSpec = "resnet20",
        dataset: DataSource = "digits",
        *,
        reward: str | RewardFn = "acc",
        budget_range: tuple[float, float] | None = None,
        use_sensitivity: bool = False,
        success_tolerance: float = 0.02,
        problem: PruningProblem | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        render_mode: str | None = None,
        **problem_settings: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise InvalidSettingError(
                f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        checked = check_settings(
            {
                "budget_range": budget_range,
                "success_tolerance": success_tolerance,
                "use_sensitivity": use_sensitivity,
            }
        )
        self.render_mode = render_mode
        self.reward_fn: RewardFn = get_reward(reward)
        if problem is None:
            # A proxy object or factory (a user's metric) goes to the problem as is; a name is a setting.
            proxy = problem_settings.pop("proxy", None)
            if isinstance(proxy, str):
                problem_settings["proxy"], proxy = proxy, None
            # An environment shows no progress bars unless asked to.
            settings = ProblemSettings.from_kwargs({"progress": False, **problem_settings})
            problem = PruningProblem(model, dataset, settings, proxy=proxy, train_kwargs=train_kwargs)
        elif not isinstance(problem, PruningProblem):
            raise InvalidSettingError(f"problem must be a PruningProblem, got {type(problem).__name__}")
        else:
            given = sorted(problem_settings) + (["train_kwargs"] if train_kwargs is not None else [])
            given += [
                n for n, v, d in (("model", model, "resnet20"), ("dataset", dataset, "digits")) if v != d
            ]
            if given:
                raise InvalidSettingError(
                    f"{', '.join(given)} would be ignored: the environment uses the settings of the given "
                    "problem; pass them to PruningProblem instead (or omit problem=)"
                )
        self.problem = p = problem
        self.budget_range = checked["budget_range"]
        if self.budget_range is not None:
            for bound in self.budget_range:
                p.check_target(bound)
        self.success_tolerance = success_tolerance
        sens = sensitivity(p) if use_sensitivity else None
        self._static = static_features(p, sens)
        self.target = p.target
        self.last_outcome: Outcome | None = None
        self._episode_over = True
        self._weight_bits = np.full(p.n_groups, FULL_PRECISION, dtype=np.int64)
        self._activation_bits = self._weight_bits.copy()

    @property
    def bits(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Joint policies: the weight and activation bits per group in the current episode (copies; groups
        not decided yet at full precision); None when policies choose channels only."""
        if self.problem.joint is None:
            return None
        return self._weight_bits.copy(), self._activation_bits.copy()

    # -- shared helpers -------------------------------------------------------------------------------
    def _sample_target(self, options: dict[str, Any] | None) -> float:
        if options and "target" in options:
            target = fraction("options['target']", options["target"])
            self.problem.check_target(target)
            return target
        if self.budget_range is None:
            return self.problem.target
        lo, hi = self.budget_range
        return float(self.np_random.uniform(lo, hi))

    def _begin_step(self) -> None:
        """Both environments refuse a step outside an episode (before reset, or after it terminated)."""
        if self._episode_over:
            raise ResetNeeded("the episode is over (or never started): call reset() before step()")

    def _finish(self, keep: np.ndarray) -> tuple[float, dict[str, Any]]:
        self._episode_over = True
        if self.problem.joint is not None:
            outcome = self.problem.evaluate_joint(keep, self._weight_bits, self._activation_bits, self.target)
        else:
            outcome = self.problem.evaluate_keep(keep, self.target)
        self.last_outcome = outcome
        reward = evaluate_reward(self.reward_fn, outcome)
        info = outcome.as_info()
        info["is_success"] = bool(
            outcome.cost_ratio <= self.target * (1 + 1e-9)
            and outcome.accuracy >= outcome.base_accuracy - self.success_tolerance
        )
        return reward, info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._render_bars()
        if self.render_mode != "ansi":
            return None
        p = self.problem
        keep = self._current_keep()
        rows = [f"{'group':<36} {'units':>6} {'kept':>6} {'ratio':>6}"]
        for g, k in zip(p.graph.groups, keep, strict=True):
            rows.append(f"{g.name[:36]:<36} {g.units:>6} {int(k):>6} {1 - k / g.units:>6.2f}")
        if p.joint is not None and p.joint.constrained:
            cost = p.joint.projector.cost_ratio(keep, self._weight_bits, self._activation_bits)
        else:
            cost = p.projector.cost_ratio(keep)
        rows.append(f"{p.metric} {cost:.3f} of base (target {self.target:.3f})")
        if self.last_outcome is not None:
            rows.append(f"proxy accuracy {self.last_outcome.accuracy:.4f} (base {p.base_accuracy:.4f})")
        return "\n".join(rows) + "\n"

    def _render_bars(self, height: int = 64, bar: int = 6) -> np.ndarray:
        """One column per group: kept fraction in green over the pruned fraction in grey."""
        kept = self._current_keep() / self.problem.units
        image = np.full((height, bar * len(kept), 3), 40, dtype=np.uint8)
        for i, kept_fraction in enumerate(kept):
            top = height - round(float(kept_fraction) * height)
            image[:top, i * bar : (i + 1) * bar - 1] = (120, 120, 120)
            image[top:, i * bar : (i + 1) * bar - 1] = (60, 180, 75)
        return image

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.target = self._sample_target(options)
        self._keep = self.problem.units.copy()
        # Joint policies: every group at full precision until decided.
        self._weight_bits = np.full(self.problem.n_groups, FULL_PRECISION, dtype=np.int64)
        self._activation_bits = self._weight_bits.copy()
        self.last_outcome = None
        self._episode_over = False
        info = {"target": self.target, **self._start_episode()}
        return self._observation(), info

    def _start_episode(self) -> dict[str, Any]:
        """Per-environment episode state; returns extra ``info`` keys for ``reset``."""
        return {}

    @property
    def kept(self) -> np.ndarray:
        """Kept units per group in the current episode (a copy; groups not decided yet are whole)."""
        return self._current_keep().copy()

    def _current_keep(self) -> np.ndarray:
        return self._keep

    def _observation(self) -> np.ndarray:
        raise NotImplementedError

    def _apply(self, action: np.ndarray) -> bool:
        """Take one decision of the episode; True once the whole policy is decided."""
        raise NotImplementedError

    def decide(self, policy: Callable[[np.ndarray], np.ndarray], target: float | None = None) -> np.ndarray:
        """Kept units per group that ``policy`` (observation -> action) chooses for ``target`` (default: the
        problem's) — an episode's decisions without scoring them: no proxy evaluation, no reward. How a
        trained agent is applied to a new budget."""
        observation, _ = self.reset(options=None if target is None else {"target": target})
        while not self._apply(np.asarray(policy(observation))):
            observation = self._observation()
        self._episode_over = True
        return self._current_keep().copy()


class LayerPruneEnv(_PruneEnv):
    """## Description

    AMC-style layer-by-layer pruning: one step per prunable channel group, in topological order. The agent
    chooses the fraction of the current group's channels to remove; the budget is enforced by an action
    wall, so the final model never exceeds the target and a policy that prunes too little is pushed to
    meet it. The pruned model is scored by the proxy at the end of the episode.

    ## Action space

    ``Box(-1, 1, (1,), float32)``: mapped affinely to a ratio in ``[0, max_ratio]``; values outside
    ``[-1, 1]`` are clipped; NaN/inf, a non-real dtype or a wrong shape raise
    ``InvalidActionError``. With joint policies (``quantize=True``, ``target_bitops`` or ``target_size``):
    ``Box(-1, 1, (3,), float32)``, the ratio, then the group's weight and activation bits ([-1, 1] split
    evenly over 2, 3, 4, 5, 6, 8 and 32 bits), the wall lowering the bits only when no count fits.

    ## Observation space

    ``Box(0, 1, (18,), float32)``: the current group's static features (see
    :data:`prune_env.observation.STATIC_FEATURES`: position, layer type, widths, kernel, stride, MACs and
    params shares, weight and BN-scale statistics, optional sensitivity) followed by
    :data:`prune_env.observation.DYNAMIC_FEATURES` (MACs removed so far, MACs still reducible, previous
    ratio, budget target); with joint policies, then the previous group's weight and activation bits / 32.
    Under a latency budget the static features end with the group's share of the predicted latency
    (:data:`prune_env.observation.LATENCY_FEATURES`), 19 in all.

    ## Rewards

    ``reward(outcome)`` at the last step (default ``"acc"``: the proxy accuracy), 0 before — unless the
    reward defines ``shape(step: StepInfo) -> float``, which is then paid at every intermediate step.

    ## Episode end

    Terminates after the last group. ``info`` then holds ``accuracy``, ``loss``, ``macs_ratio``,
    ``params_ratio``, ``ratios``, ``target``, ``is_success`` and more (see ``Outcome.as_info``).

    ## Arguments

    ``model`` and ``dataset`` as for :class:`prune_env.problem.PruningProblem`; every field of
    :class:`prune_env.settings.ProblemSettings` as a plain keyword (``target_macs``, ``eval_samples``,
    ``importance``, ``max_ratio``...; unknown ones are refused), so ``gym.make`` specs stay picklable;
    ``reward`` (preset name or callable), ``budget_range`` (sample a target per episode, shown in the
    observation), ``use_sensitivity`` (precompute per-group sensitivity), ``problem`` (share one
    pre-built problem), ``render_mode="ansi"``. ``proxy`` is a setting's name, or, as for the problem, a
    :class:`~prune_env.proxy.Proxy` or a factory of one: ``proxy=MetricProxy(mean_ap)`` scores with the
    user's own metric.
    """

    def __init__(self, model: ModelSpec = "resnet20", dataset: DataSource = "digits", **kwargs: Any) -> None:
        super().__init__(model, dataset, **kwargs)
        joint = self.problem.joint is not None
        dim = self._static.shape[1] + len(DYNAMIC_FEATURES) + (len(JOINT_FEATURES) if joint else 0)
        self.observation_space = spaces.Box(0.0, 1.0, (dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (3 if joint else 1,), np.float32)
        self._keep = self.problem.units.copy()
        self._rest = self.problem.units.copy()  # scratch for the observation's cost evaluations
        self._t = 0
        self._prev_ratio = 0.0

    def _observation(self) -> np.ndarray:
        p = self.problem
        t = min(self._t, p.n_groups - 1)
        costs, base = p.graph.costs, p.graph.base_macs
        rest = self._rest  # decided groups as decided, the rest first whole, then at their minimum
        rest[:t] = self._keep[:t]
        rest[t:] = p.units[t:]
        macs_full = costs.macs(rest)
        rest[t:] = p.projector.min_keep[t:]
        dynamic: tuple[float, ...] = (
            1.0 - macs_full / base,
            (macs_full - costs.macs(rest)) / base,
            self._prev_ratio / p.max_ratio,
            self.target,
        )
        if p.joint is not None:  # the bits the previous group got (full precision before the first)
            w = self._weight_bits[self._t - 1] if self._t else FULL_PRECISION
            a = self._activation_bits[self._t - 1] if self._t else FULL_PRECISION
            dynamic = (*dynamic, w / FULL_PRECISION, a / FULL_PRECISION)
        n_static = self._static.shape[1]
        obs = np.empty(n_static + len(dynamic), dtype=np.float32)
        obs[:n_static] = self._static[t]
        obs[n_static:] = [min(max(v, 0.0), 1.0) for v in dynamic]
        return obs

    @property
    def current_group(self) -> int:
        """The index of the group the next step decides (``n_groups`` once the episode is over)."""
        return self._t

    def _start_episode(self) -> dict[str, Any]:
        self._t = 0
        self._prev_ratio = 0.0
        return {"group": 0}

    def _apply(self, action: np.ndarray) -> bool:
        p, t = self.problem, self._t
        if p.joint is None:
            ratio = float(action_to_ratio(action, p.max_ratio, (1,))[0])
            self._keep[t] = p.projector.wall(self._keep, t, ratio, self.target)
        else:
            unit = action_to_ratio(action, 1.0, (3,))  # ratio, weight bits, activation bits in [0, 1]
            ratio = float(unit[0]) * p.max_ratio
            w, a = (int(b) for b in p.joint.bits_for(unit[1:]))
            if p.joint.constrained:
                self._keep[t], w, a = p.joint.projector.wall(
                    self._keep, self._weight_bits, self._activation_bits, t, ratio, w, a, self.target
                )
            else:
                self._keep[t] = p.projector.wall(self._keep, t, ratio, self.target)
            self._weight_bits[t], self._activation_bits[t] = w, a
        self._prev_ratio = 1.0 - self._keep[self._t] / p.units[self._t]
        self._t += 1
        return self._t >= p.n_groups

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        self._begin_step()
        p = self.problem
        self._apply(action)
        applied = self._prev_ratio
        if self._t < p.n_groups:
            reward = 0.0
            shape: Callable[[StepInfo], float] | None = getattr(self.reward_fn, "shape", None)
            if shape is not None:
                step = StepInfo(self._t - 1, applied, p.projector.cost_ratio(self._keep), self.target)
                reward = checked_reward(shape(step), shape)
            return self._observation(), reward, False, False, {"group": self._t, "applied_ratio": applied}
        reward, info = self._finish(self._keep)
        info["applied_ratio"] = applied
        return self._observation(), reward, True, False, info


class OneShotPruneEnv(_PruneEnv):
    """## Description

    RL-Pruner-style one-shot pruning: a single step whose action is the whole *pruning distribution*, one
    ratio per prunable channel group. The distribution is projected onto the budget (each ratio moves
    toward ``max_ratio`` in proportion to its room until the target is met; with ``fill_budget=True``, the
    default, a distribution that prunes more than the target needs is also scaled back until it just fits), the model
    is pruned and scored by the proxy, and the episode ends.

    ## Action space

    ``Box(-1, 1, (groups,), float32)``, mapped affinely to ratios in ``[0, max_ratio]``. With joint policies
    (``quantize=True``, ``target_bitops`` or ``target_size``): ``(3 × groups,)``, the ratios, then each
    group's weight bits, then its activation bits (see :class:`LayerPruneEnv`).

    ## Observation space

    ``Box(0, 1, (groups × 14 + 1,), float32)``: every group's static features (flattened, see
    :data:`prune_env.observation.STATIC_FEATURES`, and under a latency budget
    :data:`prune_env.observation.LATENCY_FEATURES`: ``groups × 15 + 1``) followed by the budget target.

    ## Rewards, episode end, arguments

    As :class:`LayerPruneEnv`, with the reward paid at the single step.
    """

    def __init__(self, model: ModelSpec = "resnet20", dataset: DataSource = "digits", **kwargs: Any) -> None:
        super().__init__(model, dataset, **kwargs)
        n = self.problem.n_groups
        self.observation_space = spaces.Box(0.0, 1.0, (self._static.size + 1,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (3 * n if self.problem.joint else n,), np.float32)
        self._flat = self._static.reshape(-1)
        self._keep = self.problem.units.copy()

    def _observation(self) -> np.ndarray:
        return np.append(self._flat, np.float32(self.target)).astype(np.float32)

    def _apply(self, action: np.ndarray) -> bool:
        p, n = self.problem, self.problem.n_groups
        if p.joint is None:
            self._keep = p.keep_for(action_to_ratio(action, p.max_ratio, (n,)), self.target)
            return True
        unit = action_to_ratio(action, 1.0, (3 * n,))  # ratios, weight bits, activation bits in [0, 1]
        self._keep, self._weight_bits, self._activation_bits = p.joint_keep_for(
            unit[:n] * p.max_ratio,
            p.joint.bits_for(unit[n : 2 * n]),
            p.joint.bits_for(unit[2 * n :]),
            self.target,
        )
        return True

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        self._begin_step()
        self._apply(action)
        reward, info = self._finish(self._keep)
        return self._observation(), reward, True, False, info
