"""A Stable-Baselines3 ``VecEnv`` whose environments live in Ray actors, on this machine or a cluster.

``RayVecEnv([make_env] * 8)`` works wherever SB3 takes a ``VecEnv`` (``PPO("MlpPolicy", venv)``): each
environment is built inside its own actor from its factory (sent once; the factory and its arguments must
pickle, as for ``SubprocVecEnv``), and per step only actions go out and observations, rewards and infos
come back. ``RayVecEnv.from_id("prune_env/OneShotPrune-v0", n_envs=8, env_kwargs=...)`` builds them by
Gymnasium id. Episodes end and restart inside the actors, as in SB3's own vectorised environments: the
last observation of an episode is in its info's ``"terminal_observation"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from prune_env.distributed import check_cluster_fits, start_ray, stop_ray
from prune_env.errors import InvalidSettingError
from prune_env.optional_ray import check_fits_here, cluster_address, import_ray
from prune_env.validation import check_settings


class EnvWorker:
    """One environment inside a Ray actor; steps it the way SB3's vectorised environments do."""

    def __init__(self, factory: Callable[[], gym.Env]) -> None:
        import prune_env  # noqa: F401  (registers the prune_env ids in this worker process)

        self.env = factory()

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        return self.env.observation_space, self.env.action_space

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        return self.env.reset(seed=seed, options=options or {})

    def step(self, action: Any) -> tuple[Any, float, bool, dict[str, Any], dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        # SB3's convention: a time-limit end is not a true terminal state for bootstrapping.
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict[str, Any] = {}
        if terminated or truncated:
            info["terminal_observation"] = obs
            obs, reset_info = self.env.reset()
        return obs, float(reward), bool(terminated or truncated), info, reset_info

    def get_attr(self, name: str) -> Any:
        return self.env.get_wrapper_attr(name)

    def set_attr(self, name: str, value: Any) -> None:
        setattr(self.env, name, value)

    def env_method(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class: type[gym.Wrapper]) -> bool:
        env: gym.Env = self.env
        while isinstance(env, gym.Wrapper):
            if isinstance(env, wrapper_class):
                return True
            env = env.env
        return False

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


def _check_cpus_per_env(cpus_per_env: Any) -> None:
    if not (
        isinstance(cpus_per_env, int | float) and not isinstance(cpus_per_env, bool) and cpus_per_env > 0
    ):
        raise InvalidSettingError(f"cpus_per_env must be a positive number, got {cpus_per_env!r}")


def _stack(observations: Sequence[Any], space: gym.Space) -> VecEnvObs:
    if isinstance(space, gym.spaces.Dict):
        return {key: np.stack([o[key] for o in observations]) for key in space.spaces}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(np.stack([o[k] for o in observations]) for k in range(len(space.spaces)))
    return np.stack(observations)


class RayVecEnv(VecEnv):
    """SB3 ``VecEnv`` over environments in Ray actors (see the module docstring).

    Args:
        env_fns: one factory per environment (picklable).
        address: a Ray cluster to join; None starts Ray on this machine unless already connected.
        cpus_per_env: Ray CPUs each environment's actor reserves; the environments must fit the CPUs (this
            machine's cores, checked before Ray starts, or the cluster's), or they are refused.

    :meth:`close` releases the actors, and stops Ray if this object started it (also on a failed start).
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        *,
        address: str | None = None,
        cpus_per_env: float = 1.0,
    ) -> None:
        if not env_fns or not all(callable(f) for f in env_fns):
            raise InvalidSettingError("RayVecEnv needs a non-empty list of environment factories")
        _check_cpus_per_env(cpus_per_env)
        check_settings({"ray_address": address})
        ray = import_ray()
        self._ray = ray
        self.workers: list[Any] = []
        self._pending: list[Any] = []
        self.closed = False
        asked = f"{len(env_fns)} environments"
        # Every environment's actor must be placed, or stepping would wait for ever on those that are not.
        self._owns_ray = start_ray(len(env_fns), address, asked=asked, per_worker=cpus_per_env)
        try:
            check_cluster_fits(
                len(env_fns), asked=asked, cpus_each=cpus_per_env, hint=" (or a smaller cpus_per_env)"
            )
            actor = ray.remote(EnvWorker).options(num_cpus=cpus_per_env)
            for fn in env_fns:
                self.workers.append(actor.remote(fn))
            observation_space, action_space = ray.get(self.workers[0].spaces.remote())
        except (
            BaseException
        ):  # a refusal, a factory that fails, an interrupt: nothing of ours is left running
            self._release()
            raise
        super().__init__(len(env_fns), observation_space, action_space)

    @classmethod
    def from_id(
        cls, env_id: str, n_envs: int, env_kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> RayVecEnv:
        """``n_envs`` copies of ``gymnasium.make(env_id, **env_kwargs)``."""
        kwargs = dict(env_kwargs or {})
        if isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1:
            raise InvalidSettingError(f"n_envs must be an integer >= 1, got {n_envs!r}")
        address, cpus_per_env = options.get("address"), options.get("cpus_per_env", 1.0)
        check_settings({"ray_address": address})
        _check_cpus_per_env(cpus_per_env)
        if not import_ray().is_initialized() and cluster_address(address) is None:
            # Before a list of n_envs factories exists: a huge count would fill the memory with it first.
            check_fits_here(n_envs, asked=f"{n_envs} environments", per_worker=cpus_per_env)

        def make() -> gym.Env:
            return gym.make(env_id, **kwargs)

        return cls([make] * n_envs, **options)

    def _get(self, refs: list[Any]) -> list[Any]:
        return list(self._ray.get(refs))

    def reset(self) -> VecEnvObs:
        results = self._get(
            [w.reset.remote(self._seeds[i], self._options[i]) for i, w in enumerate(self.workers)]
        )
        obs, infos = zip(*results, strict=True)
        self.reset_infos = list(infos)
        self._reset_seeds()
        self._reset_options()
        return _stack(obs, self.observation_space)

    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [w.step.remote(a) for w, a in zip(self.workers, actions, strict=True)]

    def step_wait(self) -> VecEnvStepReturn:
        results = self._get(self._pending)
        self._pending = []
        obs, rewards, dones, infos, reset_infos = zip(*results, strict=True)
        self.reset_infos = list(reset_infos)
        return (
            _stack(obs, self.observation_space),
            np.array(rewards, dtype=np.float32),
            np.array(dones, dtype=bool),
            list(infos),
        )

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._pending:
                self._get(self._pending)
            self._get([w.close.remote() for w in self.workers])
        finally:  # even when an environment failed to close
            self._release()

    def _release(self) -> None:
        """Kill the actors, and stop Ray if this object started (or joined) it."""
        workers, self.workers, self._pending = self.workers, [], []
        self.closed = True
        try:
            for w in workers:
                self._ray.kill(w)
        finally:
            owned, self._owns_ray = self._owns_ray, False
            stop_ray(owned)

    def _targets(self, indices: VecEnvIndices) -> list[Any]:
        return [self.workers[i] for i in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._get([w.get_attr.remote(attr_name) for w in self._targets(indices)])

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._get([w.set_attr.remote(attr_name, value) for w in self._targets(indices)])

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        return self._get(
            [w.env_method.remote(method_name, method_args, method_kwargs) for w in self._targets(indices)]
        )

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._get([w.is_wrapped.remote(wrapper_class) for w in self._targets(indices)])

    def get_images(self) -> Sequence[np.ndarray | None]:
        return self._get([w.render.remote() for w in self.workers])
