"""Stable-Baselines3 learners (PPO, A2C, SAC, TD3, DDPG) and AMC's DDPG, behind the common interface.

Every learner trains on one of the two environments (``env="oneshot"``, the default: one step = the whole
pruning distribution; or ``env="layer"``: AMC's layer-by-layer episodes), built on the evaluator's own
:class:`~prune_env.problem.PruningProblem` and reward, so its scores are exactly those of every other agent.
Each finished episode is one proxy evaluation: :class:`BudgetWrapper` records it with the evaluator and
refuses to start the evaluation that would exceed the budget, and :class:`StopOnBudget` ends ``learn()``
as soon as the budget is spent — so no learner can ever see more evaluations than any other agent.

AMC's DDPG is :class:`agents.amc.AMCDDPG`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, DDPG, PPO, SAC, TD3
from stable_baselines3.common import torch_layers
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.policies import BasePolicy
from torch import nn
from torch.nn.modules import activation

from agents.amc import AMCDDPG, TruncatedNormalNoise
from agents.evaluator import BudgetedEvaluator, BudgetExhausted
from agents.policies import (
    POLICY_META,
    check_format,
    check_target_in_range,
    is_finite_number,
    load_tensors_into,
    meta_field,
    pickled_policy_error,
    read_policy_meta,
    read_tensors,
    refuse,
    short_value,
    trained_range,
    write_policy,
)
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


POLICY_WEIGHTS = "policy.pt"

# Constructor arguments of SB3's policies that are classes: saved by name, and only names of this module
# that are subclasses of this base are rebuilt, so a policy file cannot name arbitrary code to run.
_CLASS_KWARGS: dict[str, tuple[Any, type]] = {
    "activation_fn": (activation, nn.Module),
    "optimizer_class": (torch.optim, torch.optim.Optimizer),
    "features_extractor_class": (torch_layers, torch_layers.BaseFeaturesExtractor),
}
# Built by the policy itself, not settings: the spaces are saved on their own, the schedule is unused.
_NOT_KWARGS = ("observation_space", "action_space", "lr_schedule")


def _plain(value: Any) -> bool:
    """JSON holds it as is: None, bools, ints, finite floats, strings, and lists / string-keyed dicts."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _known_class(key: str, name: str) -> type | None:
    """The class ``name`` of the module allowed for ``key`` (defined there, a subclass of its base)."""
    module, base = _CLASS_KWARGS[key]
    found = getattr(module, name, None)
    if (
        isinstance(found, type)
        and issubclass(found, base)
        and found is not base
        and found.__module__.startswith(module.__name__)
    ):
        return found
    return None


def encode_policy_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` of an SB3 policy as JSON (classes by name); refuses what JSON cannot rebuild."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _CLASS_KWARGS:
            module = _CLASS_KWARGS[key][0]
            name = getattr(value, "__name__", None)
            if not isinstance(name, str) or _known_class(key, name) is not value:
                raise InvalidSettingError(
                    f"policy_kwargs {key}={value!r} cannot be saved with the policy (it would have to be "
                    f"pickled): use a class of {module.__name__}"
                )
            out[key] = name
        elif _plain(value):
            out[key] = json.loads(json.dumps(value))  # tuples as lists, as they come back
        else:
            raise InvalidSettingError(
                f"policy_kwargs {key}={value!r} cannot be saved with the policy (it would have to be "
                "pickled): use numbers, strings, lists and dicts of them"
            )
    return out


def _decode_policy_kwargs(meta: Mapping[str, Any], file: Path) -> dict[str, Any]:
    kwargs = dict(
        meta_field(
            meta, "policy_kwargs", file, "an object of SB3 policy arguments", lambda v: isinstance(v, dict)
        )
    )
    for key, (module, _base) in _CLASS_KWARGS.items():
        if key in kwargs:
            name = kwargs[key]
            found = _known_class(key, name) if isinstance(name, str) else None
            if found is None:
                refuse(file, f"policy_kwargs {key} {short_value(name)} is no class of {module.__name__}")
            kwargs[key] = found
    arch = kwargs.get("net_arch", [])
    nets = list(arch.values()) if isinstance(arch, dict) else [arch]
    if not all(
        isinstance(net, list) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in net)
        for net in nets
    ):
        refuse(
            file,
            f"policy_kwargs net_arch must be a list of layer widths (or a dict of such lists), "
            f"got {short_value(arch)}",
        )
    return kwargs


def _box_to_json(space: gym.spaces.Box) -> dict[str, Any]:
    return {
        "shape": list(space.shape),
        "dtype": str(space.dtype),
        "low": space.low.reshape(-1).tolist(),
        "high": space.high.reshape(-1).tolist(),
    }


def _box_from_json(meta: Mapping[str, Any], key: str, file: Path) -> gym.spaces.Box:
    """The Box space saved under ``key``: float32, one dimension, finite bounds with low <= high."""
    box = meta_field(
        meta, key, file, "an object with shape, dtype, low and high", lambda v: isinstance(v, dict)
    )
    shape = box.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 1
        and isinstance(shape[0], int)
        and not isinstance(shape[0], bool)
        and shape[0] > 0
    ):
        refuse(file, f"{key} shape must be [size] (a positive integer), got {short_value(shape)}")
    if box.get("dtype") != "float32":
        refuse(file, f"{key} dtype must be 'float32', got {short_value(box.get('dtype'))}")
    bounds = []
    for side in ("low", "high"):
        values = box.get(side)
        if not (
            isinstance(values, list) and len(values) == shape[0] and all(is_finite_number(v) for v in values)
        ):
            refuse(file, f"{key} {side} must be {shape[0]} finite numbers, got {short_value(values)}")
        bounds.append(np.array(values, dtype=np.float32))
    if not bool(np.all(bounds[0] <= bounds[1])):
        refuse(file, f"{key} has a low bound above its high bound")
    return gym.spaces.Box(bounds[0], bounds[1], dtype=np.float32)


def _check_network_size(
    kwargs: Mapping[str, Any], observations: int, state: Mapping[str, torch.Tensor], file: Path
) -> None:
    """Refuse settings describing a network far larger than the tensors saved for it, before building it
    (which would allocate that memory): every layer's weight matrix is one of the saved tensors."""
    values = sum(t.numel() for t in state.values())
    arch = kwargs.get("net_arch", [])
    for net in arch.values() if isinstance(arch, dict) else [arch]:
        chain = [observations, *net]
        for a, b in itertools.pairwise(chain):
            if a * b > values or len(net) > len(state):
                refuse(
                    file,
                    f"policy_kwargs net_arch {short_value(arch)} describes a network larger than the "
                    f"{values} values saved in {POLICY_WEIGHTS}",
                )
    critics = kwargs.get("n_critics", 1)
    if not isinstance(critics, int) or isinstance(critics, bool) or not 1 <= critics <= len(state):
        refuse(
            file,
            f"policy_kwargs n_critics must be a positive integer within the saved tensors' "
            f"count, got {short_value(critics)}",
        )


def _unused_schedule(_progress: float) -> float:
    return 0.0  # the optimiser SB3 builds with the policy never steps when it only decides


@dataclass
class SB3Policy:
    """A trained SB3 learner's policy network as a pruning policy: for any target (within the
    ``budget_range`` it was trained on, if any) it decides kept counts from the environment's
    observation — no evaluation.

    ``save(directory)`` writes the network's weights as plain tensors (``policy.pt``) and ``policy.json``:
    the algorithm, environment, observation and action spaces, the policy's constructor arguments and the
    budget range — all :meth:`load` needs to rebuild the network and load the weights into it, with
    nothing unpickled.
    """

    algo: str
    env: str
    network: BasePolicy
    budget_range: tuple[float, float] | None = None

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray:
        """Kept units per group for ``target`` (default: the problem's), by the learner's deterministic
        action(s); within the target by construction, and no proxy evaluation is spent."""
        check_target_in_range(self.budget_range, problem, target, self.algo)
        cls = OneShotPruneEnv if self.env == "oneshot" else LayerPruneEnv
        env = cls(problem=problem)
        if env.observation_space.shape != self.network.observation_space.shape:
            raise InvalidSettingError(
                f"this {self.algo} policy was trained on a problem with another number of groups: its "
                f"observations have shape {self.network.observation_space.shape}, this problem's "
                f"{env.observation_space.shape}"
            )
        return env.decide(lambda obs: self.network.predict(obs, deterministic=True)[0], target)

    def save(self, directory: str | Path) -> Path:
        params = self.network._get_constructor_parameters()
        meta = {
            "algo": self.algo,
            "env": self.env,
            "observation_space": _box_to_json(params["observation_space"]),
            "action_space": _box_to_json(params["action_space"]),
            "policy_kwargs": encode_policy_kwargs({k: v for k, v in params.items() if k not in _NOT_KWARGS}),
        }
        return write_policy(directory, "sb3", meta, self.budget_range, (POLICY_WEIGHTS, self.network))

    @classmethod
    def load(cls, directory: str | Path) -> SB3Policy:
        return cls.from_meta(Path(directory), read_policy_meta(directory))

    @classmethod
    def from_meta(cls, path: Path, meta: Mapping[str, Any]) -> SB3Policy:
        """The policy ``path/policy.json`` (already read as ``meta``) describes, with its weights."""
        file = path / POLICY_META
        if "format" not in meta:
            raise pickled_policy_error(path)
        check_format(meta, file, required=True)
        algo = meta_field(
            meta, "algo", file, f"one of {sorted(ALGOS)}", lambda v: isinstance(v, str) and v in ALGOS
        )
        env = meta_field(meta, "env", file, f"one of {ENVS}", lambda v: isinstance(v, str) and v in ENVS)
        span = trained_range(meta, file)
        observations = _box_from_json(meta, "observation_space", file)
        actions = _box_from_json(meta, "action_space", file)
        kwargs = _decode_policy_kwargs(meta, file)
        weights = path / POLICY_WEIGHTS
        state = read_tensors(weights, "policy weights file")
        _check_network_size(kwargs, observations.shape[0], state, file)
        policy_class = ALGOS[algo].policy_aliases["MlpPolicy"]
        try:
            network = policy_class(observations, actions, _unused_schedule, **kwargs)
        except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            refuse(
                file,
                f"policy_kwargs cannot build a {algo} policy ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:120]})",
            )
        load_tensors_into(network, state, weights)
        network.set_training_mode(False)
        return cls(algo, env, network, span)


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
        return SB3Policy(name, env, model.policy, evaluator.budget_range)

    agent.__name__ = name
    agent.__doc__ = (
        f"Stable-Baselines3 {name.upper()} on the {default_env!r} environment (see :class:`SB3Settings`)."
    )
    return register_agent(name, SB3Settings, budget_conditioned=True, joint_policies=True)(agent)


for _name in ("ppo", "a2c", "sac", "td3", "ddpg"):
    _register(_name, "oneshot")
_register("amc", "layer")
