"""Stable-Baselines3 learners (PPO, A2C, SAC, TD3, DDPG) and AMC's DDPG, behind the common interface.

Every learner trains on one of the two environments (``env="oneshot"``, the default: one step = the whole
pruning distribution; or ``env="layer"``: AMC's layer-by-layer episodes), built on the evaluator's own
:class:`~prune_env.problem.PruningProblem` and reward, so its scores are exactly those of every other agent.
Each finished episode is one proxy evaluation: :class:`BudgetWrapper` records it with the evaluator and
refuses to start the evaluation that would exceed the budget, and :class:`StopOnBudget` ends ``learn()``
as soon as the budget is spent — so no learner can ever see more evaluations than any other agent.

AMC (He et al., 2018, "AMC: AutoML for Model Compression") is :class:`AMCDDPG`, a subclass of SB3's DDPG
rather than a separate implementation: AMC's three departures from textbook DDPG fit SB3's extension
points. (1) Random warm-up episodes are SB3's ``learning_starts`` (uniform random actions), measured in
episodes × groups. (2) Exploration samples a *truncated* normal around the actor's output, inside the
action bounds, with σ decaying ×0.95 per episode after warm-up (:class:`TruncatedNormalNoise`, applied in
``_sample_action``). (3) The reward, known only when the episode ends, is paid to *every* transition of the
episode minus a moving-average baseline: ``_store_transition`` holds an episode's transitions back and adds
them to the replay buffer when it ends, with that advantage as their reward (SB3 would otherwise store the
zero intermediate rewards). Actor and critic have two 300-unit hidden layers, learning rates 1e-4 / 1e-3,
τ = 0.01, γ = 1, batch 64, one gradient step per transition — AMC's settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from stable_baselines3 import A2C, DDPG, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import ActionNoise, NormalActionNoise

from agents.evaluator import BudgetedEvaluator, BudgetExhausted
from agents.policies import POLICY_META
from agents.registry import register_agent
from prune_env.env import LayerPruneEnv, OneShotPruneEnv
from prune_env.errors import InvalidSettingError
from prune_env.problem import PruningProblem

ENVS = ("oneshot", "layer")


# ------------------------------------------------------------------------------------------------ budget glue


class BudgetWrapper(gym.Wrapper):
    """Counts every finished episode (one proxy evaluation) with ``evaluator.record``.

    Raises :class:`BudgetExhausted` *before* a step that would run the budget+1-th evaluation, so the proxy
    is never called over budget even if a learner ignores :class:`StopOnBudget`.
    """

    def __init__(self, env: gym.Env, evaluator: BudgetedEvaluator) -> None:
        super().__init__(env)
        self.evaluator = evaluator

    def _step_evaluates(self) -> bool:
        inner = self.env.unwrapped
        if isinstance(inner, LayerPruneEnv):
            return inner.current_group >= inner.problem.n_groups - 1  # only the last group's step scores
        return True  # one-shot: every step is a whole episode

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._step_evaluates() and self.evaluator.remaining <= 0:
            raise BudgetExhausted(f"evaluation budget of {self.evaluator.budget_evals} spent")
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            outcome = getattr(self.env.unwrapped, "last_outcome", None)
            if outcome is not None:
                self.evaluator.record(outcome)
        return obs, reward, terminated, truncated, info


class StopOnBudget(BaseCallback):
    """Ends ``learn()`` once the evaluator's budget is spent (before any further episode can finish)."""

    def __init__(self, evaluator: BudgetedEvaluator) -> None:
        super().__init__()
        self.evaluator = evaluator

    def _on_step(self) -> bool:
        return self.evaluator.remaining > 0


def make_env(evaluator: BudgetedEvaluator, env: str = "oneshot") -> BudgetWrapper:
    """An environment on the evaluator's problem and reward, wrapped to count evaluations."""
    if env not in ENVS:
        raise InvalidSettingError(f"env must be one of {ENVS}, got {env!r}")
    cls = OneShotPruneEnv if env == "oneshot" else LayerPruneEnv
    made = cls(problem=evaluator.problem, reward=evaluator.reward_fn, budget_range=evaluator.budget_range)
    return BudgetWrapper(made, evaluator)


# ------------------------------------------------------------------------------------------------ AMC


class TruncatedNormalNoise(ActionNoise):
    """AMC's exploration: a normal around the actor's action truncated to ``[low, high]``; σ decays.

    ``sigma`` is in the scaled action space ([-1, 1]); ``decay()`` multiplies it by ``decay_rate`` once per
    episode after warm-up. Samples by rejection (a few tries suffice for σ <= 1 on [-1, 1]), then clips.
    """

    def __init__(
        self,
        sigma: float,
        decay_rate: float = 0.95,
        low: float = -1.0,
        high: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        self.sigma0 = float(sigma)
        self.sigma = float(sigma)
        self.decay_rate = decay_rate
        self.low, self.high = low, high
        self.rng = rng or np.random.default_rng(0)

    def perturb(self, mean: np.ndarray) -> np.ndarray:
        mean = np.asarray(mean, dtype=np.float64)
        out = mean.copy()
        todo = np.ones(mean.shape, dtype=bool)
        for _ in range(32):
            draw = self.rng.normal(mean, self.sigma)
            ok = todo & (draw >= self.low) & (draw <= self.high)
            out[ok] = draw[ok]
            todo &= ~ok
            if not todo.any():
                break
        return np.clip(out, self.low, self.high).astype(np.float32)

    def decay(self) -> None:
        self.sigma *= self.decay_rate

    def reset(self) -> None:
        self.sigma = self.sigma0

    def __call__(self) -> np.ndarray:  # ActionNoise's additive interface: not used by AMCDDPG
        raise NotImplementedError("TruncatedNormalNoise perturbs an action: call perturb(action)")


class _Capture:
    """Stands in for the replay buffer to capture the ``add`` calls SB3 would make."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def add(self, *args: Any) -> None:
        self.calls.append(args)


class AMCDDPG(DDPG):
    """SB3's DDPG with AMC's warm-up, truncated-normal decaying noise and per-episode reward baseline."""

    def __init__(
        self,
        *args: Any,
        noise: TruncatedNormalNoise,
        warmup_steps: int,
        baseline_alpha: float = 0.5,
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.noise = noise
        self.warmup_steps = warmup_steps
        self.baseline_alpha = baseline_alpha
        self.actor_lr = actor_lr
        self.critic_lr = critic_lr
        self.baseline: float | None = None
        self._pending: list[tuple[Any, ...]] = []

    def _update_learning_rate(self, optimizers: Any) -> None:
        # AMC trains the actor 10x slower than the critic; SB3 has one learning rate for both.
        self.logger.record("train/learning_rate", self.critic_lr)
        for group in self.actor.optimizer.param_groups:
            group["lr"] = self.actor_lr
        for group in self.critic.optimizer.param_groups:
            group["lr"] = self.critic_lr

    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.num_timesteps < learning_starts:
            return super()._sample_action(learning_starts, None, n_envs)  # uniform random warm-up
        assert self._last_obs is not None
        action, _ = self.predict(self._last_obs, deterministic=True)
        scaled = self.noise.perturb(self.policy.scale_action(action))
        return self.policy.unscale_action(scaled), scaled

    def _store_transition(
        self,
        replay_buffer: Any,
        buffer_action: np.ndarray,
        new_obs: Any,
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        capture = _Capture()
        # Duck-typed: SB3 only calls the buffer's ``add``.
        super()._store_transition(capture, buffer_action, new_obs, reward, dones, infos)  # type: ignore[arg-type]
        self._pending.extend(capture.calls)
        if not dones[0]:
            return
        final = float(reward[0])
        # Advantage over the moving average of past episodes' rewards (AMC's variance reduction); the first
        # episode has no baseline yet and is stored at 0 advantage.
        baseline = final if self.baseline is None else self.baseline
        advantage = np.array([final - baseline], dtype=np.float32)
        self.baseline = (1 - self.baseline_alpha) * baseline + self.baseline_alpha * final
        for obs, next_obs, action, _reward, done, info in self._pending:
            replay_buffer.add(obs, next_obs, action, advantage, done, info)
        self._pending.clear()
        if self.num_timesteps >= self.warmup_steps:
            self.noise.decay()


# ------------------------------------------------------------------------------------------------ agents


def _steps_per_episode(evaluator: BudgetedEvaluator, env: str) -> int:
    return evaluator.n_groups if env == "layer" else 1


def _warmup_episodes(budget: int) -> int:
    """AMC uses 100 random episodes; scaled down so small budgets still leave most episodes to learn."""
    return max(1, min(100, budget // 4))


def _defaults(algo: str, evaluator: BudgetedEvaluator, env: str, rng: np.random.Generator) -> dict[str, Any]:
    """Settings for tiny evaluation budgets (tens to hundreds of episodes), per algorithm."""
    steps = _steps_per_episode(evaluator, env)
    budget = evaluator.budget_evals
    n_actions = 1 if env == "layer" else evaluator.n_groups
    if algo in ("ppo", "a2c"):
        episodes_per_rollout = max(4, min(16, budget // 4)) if algo == "ppo" else max(1, min(4, budget // 8))
        common: dict[str, Any] = {
            "n_steps": episodes_per_rollout * steps,
            "gamma": 1.0,  # finite episodes with one terminal reward: no discounting needed
            "gae_lambda": 1.0,
            "policy_kwargs": {"net_arch": [64, 64], "log_std_init": -0.5},
        }
        if algo == "ppo":
            common.update(batch_size=min(64, episodes_per_rollout * steps), n_epochs=10, learning_rate=3e-4)
        else:
            common.update(learning_rate=7e-4)
        return common
    off: dict[str, Any] = {
        "learning_starts": _warmup_episodes(budget) * steps,
        "batch_size": 32,
        "buffer_size": 10_000,
        "gamma": 1.0,
        "train_freq": 1,
        "gradient_steps": 1,
        "policy_kwargs": {"net_arch": [64, 64]},
    }
    if algo in ("td3", "ddpg"):
        off["action_noise"] = NormalActionNoise(np.zeros(n_actions), np.full(n_actions, 0.2))
    if algo == "amc":
        off.update(
            learning_starts=_warmup_episodes(budget) * steps,
            batch_size=64,
            buffer_size=2_000,
            tau=0.01,
            policy_kwargs={"net_arch": {"pi": [300, 300], "qf": [300, 300]}},
            noise=TruncatedNormalNoise(sigma=1.0, rng=np.random.default_rng(int(rng.integers(2**31)))),
            warmup_steps=_warmup_episodes(budget) * steps,
        )
    return off


ALGOS: dict[str, type[BaseAlgorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "sac": SAC,
    "td3": TD3,
    "ddpg": DDPG,
    "amc": AMCDDPG,
}


@dataclass(frozen=True)
class SB3Settings:
    """Settings of the Stable-Baselines3 agents.

    ``env``: "oneshot" or "layer" (``None``: the agent's own default, "layer" for AMC, "oneshot" for the
    others); ``tensorboard_log``: a directory for SB3's TensorBoard logs; ``verbose``: SB3's verbosity;
    ``learner_kwargs``: constructor arguments of the SB3 algorithm replacing this module's defaults (e.g.
    ``{"learning_rate": 1e-3, "n_steps": 32}``).
    """

    env: str | None = None
    tensorboard_log: str | None = None
    verbose: int = 0
    learner_kwargs: Mapping[str, Any] = field(default_factory=dict)


def run_sb3(
    evaluator: BudgetedEvaluator,
    rng: np.random.Generator,
    *,
    algo: str = "ppo",
    env: str = "oneshot",
    tensorboard_log: str | None = None,
    verbose: int = 0,
    **overrides: Any,
) -> BaseAlgorithm:
    """Train an SB3 learner until the evaluation budget is spent; returns the trained model.

    ``algo``: one of :data:`ALGOS`; ``env``: "oneshot" or "layer" (AMC defaults to "layer");
    ``tensorboard_log``: a directory for SB3's TensorBoard logs; ``overrides``: constructor arguments
    replacing the defaults of :func:`_defaults` (e.g. ``learning_rate=1e-3``, ``n_steps=32``).
    The evaluator keeps the best policy seen; the learner's own final policy is not evaluated again.
    """
    if algo not in ALGOS:
        raise InvalidSettingError(f"algo must be one of {sorted(ALGOS)}, got {algo!r}")
    wrapped = make_env(evaluator, env)
    settings = {**_defaults(algo, evaluator, env, rng), **overrides}
    seed = int(rng.integers(2**31))
    model = ALGOS[algo](
        "MlpPolicy",
        wrapped,
        seed=seed,
        device="cpu",
        verbose=verbose,
        tensorboard_log=tensorboard_log,
        **settings,
    )
    if tensorboard_log is None and verbose == 0:
        # Nothing to write: without a logger of our own, SB3 creates an empty /tmp/SB3-<date> per run.
        model.set_logger(Logger(folder=None, output_formats=[]))
    # Enough timesteps to spend the whole budget; the callback (and the wrapper) stop it exactly there.
    total = (evaluator.remaining + 1) * _steps_per_episode(evaluator, env)
    model.learn(total_timesteps=total, callback=StopOnBudget(evaluator), tb_log_name=algo)
    return model


POLICY_FILE = "policy.zip"


@dataclass
class SB3Policy:
    """A trained SB3 learner as a pruning policy: for any target (within the ``budget_range`` it was
    trained on, if any) it decides kept counts from the environment's observation — no evaluation.

    ``save(directory)`` writes SB3's own ``policy.zip`` and a small ``policy.json`` (algorithm and
    environment); :meth:`load` reads them back.
    """

    algo: str
    env: str
    model: BaseAlgorithm
    budget_range: tuple[float, float] | None = None

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray:
        """Kept units per group for ``target`` (default: the problem's), by the learner's deterministic
        action(s); within the target by construction, and no proxy evaluation is spent."""
        cls = OneShotPruneEnv if self.env == "oneshot" else LayerPruneEnv
        env = cls(problem=problem)
        if env.observation_space.shape != self.model.observation_space.shape:
            raise InvalidSettingError(
                f"this {self.algo} policy was trained on a problem with another number of groups: its "
                f"observations have shape {self.model.observation_space.shape}, this problem's "
                f"{env.observation_space.shape}"
            )
        return env.decide(lambda obs: self.model.predict(obs, deterministic=True)[0], target)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save(path / POLICY_FILE)
        meta = {"kind": "sb3", "algo": self.algo, "env": self.env, "budget_range": self.budget_range}
        (path / POLICY_META).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> SB3Policy:
        path = Path(directory)
        try:
            meta = json.loads((path / POLICY_META).read_text())
            algo, env = meta["algo"], meta["env"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidSettingError(
                f"{path} holds no saved policy ({type(exc).__name__}: {exc}); save one with SB3Policy.save"
            ) from None
        if algo not in ALGOS or env not in ENVS:
            raise InvalidSettingError(
                f"{path / POLICY_META}: unknown algorithm {algo!r} or environment {env!r}"
            )
        model = ALGOS[algo].load(path / POLICY_FILE, device="cpu")
        span = meta.get("budget_range")
        return cls(algo, env, model, None if span is None else (float(span[0]), float(span[1])))


def _register(name: str, default_env: str) -> Callable[..., SB3Policy]:
    def agent(evaluator: BudgetedEvaluator, rng: np.random.Generator, s: SB3Settings) -> SB3Policy:
        env = s.env or default_env
        model = run_sb3(
            evaluator,
            rng,
            algo=name,
            env=env,
            tensorboard_log=s.tensorboard_log,
            verbose=s.verbose,
            **dict(s.learner_kwargs),
        )
        return SB3Policy(name, env, model, evaluator.budget_range)

    agent.__name__ = name
    agent.__doc__ = (
        f"Stable-Baselines3 {name.upper()} on the {default_env!r} environment (see :class:`SB3Settings`)."
    )
    return register_agent(name, SB3Settings, budget_conditioned=True, joint_policies=True)(agent)


for _name in ("ppo", "a2c", "sac", "td3", "ddpg"):
    _register(_name, "oneshot")
_register("amc", "layer")
