"""AMC (He et al., 2018, "AMC: AutoML for Model Compression") is :class:`AMCDDPG`, a subclass of SB3's DDPG
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

from typing import Any

import numpy as np
from stable_baselines3 import DDPG
from stable_baselines3.common.noise import ActionNoise


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
