"""Every public entry point refuses bad settings with a typed error, before building anything.

One table of bad values is run through the environments, ``PruningProblem``, ``agents.search``,
``BudgetedEvaluator``, ``benchmark.run`` and the CLI: the same rules everywhere. Data loading, training and
graph building are replaced by a tripwire, so a check that comes too late fails the test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from cli_output import one_error_line
from gymnasium.error import ResetNeeded
from quick import QUICK_SCORING
from torch import nn

import agents
import prune_env.problem
from prune_env.app import benchmark, cli
from prune_env.env import LayerPruneEnv, OneShotPruneEnv
from prune_env.errors import (
    InvalidActionError,
    InvalidSettingError,
    PruneEnvError,
    RewardError,
    UnknownNameError,
)
from prune_env.problem import PruningProblem

# (setting, bad value, what the message must say)
BAD: list[tuple[str, Any, str]] = [
    ("target_macs", 0, "target_macs must be a fraction in (0, 1]"),
    ("target_macs", 1.5, "target_macs must be a fraction"),
    ("target_macs", float("nan"), "target_macs must be a finite number"),
    ("target_macs", "0.5", "target_macs must be a real number"),
    ("target_macs", True, "target_macs must be a real number"),
    ("target_params", -0.1, "target_params must be a fraction"),
    ("eval_samples", 0, "eval_samples must be an integer >= 1"),
    ("eval_samples", -5, "eval_samples must be an integer >= 1"),
    ("eval_samples", 2.5, "eval_samples must be an integer"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("seed", 2**40, "seed must be an integer >= 0 and <= 4294967295"),
    ("seed", 1.0, "seed must be an integer"),
    ("max_ratio", 0.0, "max_ratio must be a fraction in (0, 1]"),
    ("max_ratio", 1.5, "max_ratio must be a fraction in (0, 1]"),
    ("round_to", 0, "round_to must be an integer >= 1"),
    ("bn_recalib_batches", -1, "bn_recalib_batches must be an integer >= 0"),
    ("finetune_steps", 2.0, "finetune_steps must be an integer"),
    ("fill_budget", "yes", "fill_budget must be True or False"),
    ("importance", "nope", "unknown importance 'nope'"),
    ("train_kwargs", {"epochs": -1}, "epochs must be >= 0"),
    ("train_kwargs", {"epoch": 3}, "unknown training options ['epoch']"),
    ("proxy", object(), "proxy must be a prune_env.proxy.Proxy"),
    ("proxy", "supernets", "proxy must be one of 'recalibration', 'distillation', 'supernet', 'pruningnet'"),
    ("proxy_steps", -1, "proxy_steps must be an integer >= 0"),
    ("proxy_steps", 100, "proxy_steps=100 trains a proxy, but proxy='recalibration' is not trained"),
]
ENV_ONLY: list[tuple[str, Any, str]] = [
    ("budget_range", (0.3,), "budget_range must be a pair"),
    ("budget_range", (0.6, 0.3), "low <= high"),
    ("budget_range", "ab", "budget_range must be a pair"),
    ("budget_range", (0.3, float("inf")), "budget_range must be a finite number"),
    ("success_tolerance", float("nan"), "success_tolerance must be a finite number"),
    ("success_tolerance", 2.0, "success_tolerance must be a number in [0, 1]"),
    ("use_sensitivity", 1, "use_sensitivity must be True or False"),
    ("reward", "accuracy", "unknown reward 'accuracy'"),
]


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading data, training or tracing a model fails the test: checks must come before all of them."""

    def built(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("built something before checking the settings")

    for name in ("as_splits", "train_base", "build_graph"):
        monkeypatch.setattr(prune_env.problem, name, built)


def _case_id(case: tuple[str, Any, str]) -> str:
    value = case[1]
    shown = repr(value) if isinstance(value, (int, float, str, tuple, dict, bool)) else type(value).__name__
    return f"{case[0]}={shown}"  # stable across processes: pytest-xdist compares the ids of its workers


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[_case_id(c) for c in BAD])
@pytest.mark.parametrize("entry", ["problem", "oneshot", "layer"])
def test_problem_and_envs_refuse_bad_settings(entry: str, name: str, value: Any, message: str) -> None:
    build: Callable[..., Any] = {
        "problem": PruningProblem,
        "oneshot": OneShotPruneEnv,
        "layer": LayerPruneEnv,
    }[entry]
    if entry != "problem" and name == "proxy" and not isinstance(value, str):
        pytest.skip("the environments take a proxy object through problem=")
    with pytest.raises(PruneEnvError, match=_escaped(message)):
        build("resnet20", "digits", **{name: value})


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize(("name", "value", "message"), ENV_ONLY, ids=[_case_id(c) for c in ENV_ONLY])
@pytest.mark.parametrize("env_id", ["prune_env/OneShotPrune-v0", "prune_env/LayerPrune-v0"])
def test_registered_envs_refuse_bad_settings(env_id: str, name: str, value: Any, message: str) -> None:
    with pytest.raises(PruneEnvError, match=_escaped(message)):
        gym.make(env_id, **{name: value})


@pytest.mark.usefixtures("tripwire")
def test_both_targets_and_bad_models_are_refused() -> None:
    with pytest.raises(InvalidSettingError, match="give one budget, not target_macs and target_params"):
        PruningProblem("resnet20", "digits", target_macs=0.5, target_params=0.5)
    with pytest.raises(UnknownNameError, match="unknown model 'resnet21'"):
        PruningProblem("resnet21", "digits")
    with pytest.raises(InvalidSettingError, match="model must be a zoo name"):
        PruningProblem(42, "digits")  # type: ignore[arg-type]


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def _never_called() -> gym.Env:
    raise AssertionError("the environment factory ran before the settings were checked")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"budget_evals": 0}, InvalidSettingError, "budget_evals must be an integer >= 1"),
        ({"budget_evals": 2.5}, InvalidSettingError, "budget_evals must be an integer"),
        ({"seed": -1}, InvalidSettingError, "seed must be an integer >= 0"),
        ({"reward": "nope"}, UnknownNameError, "unknown reward 'nope'"),
        ({"agent": "nope"}, UnknownNameError, "unknown agent 'nope'"),
        ({"agent": 3}, InvalidSettingError, "agent must be a registered name or a function"),
    ],
)
def test_agents_search_refuses_bad_settings(kwargs: dict[str, Any], error: type, message: str) -> None:
    args = {"agent": "random", "problem_or_env_factory": _never_called, "budget_evals": 2, **kwargs}
    with pytest.raises(error, match=_escaped(message)):
        agents.search(**args)
    with pytest.raises(InvalidSettingError, match="pass a PruningProblem or a factory"):
        agents.search("random", "resnet20", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"evals": 0}, "evals must be an integer >= 1"),
        ({"targets": (0.5, 0.0)}, "targets[1] must be a fraction"),
        ({"targets": ()}, "targets must be a non-empty sequence"),
        ({"seeds": (0, -2)}, "seeds[1] must be an integer >= 0"),
        ({"finetune_epochs": -1}, "finetune_epochs must be an integer >= 0"),
        ({"finetune_samples": 0}, "finetune_samples must be an integer >= 1"),
        ({"metric": "flops"}, "metric must be one of 'macs', 'params'"),
        ({"problem_kwargs": {"eval_samples": 0}}, "eval_samples must be an integer >= 1"),
        ({"problem_kwargs": {"target_macs": 0.5}}, "problem_kwargs sets target_macs"),
        ({"problem_kwargs": {"eval_sample": 5}}, "PruningProblem has no setting eval_sample"),
        ({"agents": ["nope"]}, "unknown agent 'nope'"),
        ({"models": ["resnet21"]}, "unknown model 'resnet21'"),
        ({"reward": "nope"}, "unknown reward 'nope'"),
    ],
)
def test_benchmark_run_refuses_bad_settings(
    kwargs: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmark.GridSpec, "problem", lambda *a, **k: pytest.fail("built a problem"))
    out = tmp_path / "grid"
    with pytest.raises(PruneEnvError, match=_escaped(message)):
        benchmark.run(**{"agents": ["random"], "out": out, "progress": False, **kwargs})
    assert not out.exists()  # nothing written either


def test_budgeted_evaluator_refuses_bad_budgets() -> None:
    with pytest.raises(InvalidSettingError, match="budget_evals must be an integer >= 1"):
        agents.BudgetedEvaluator(None, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match="problem must be a PruningProblem"):
        agents.BudgetedEvaluator("resnet20", 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval-samples", "0"], "--eval-samples must be an integer >= 1, got 0"),
        (["--eval-samples", "-5"], "--eval-samples must be an integer >= 1, got -5"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--max-ratio", "0"], "--max-ratio must be a fraction in (0, 1]"),
        (["--max-ratio", "nan"], "--max-ratio must be a finite number"),
        (["--target-macs", "0"], "--target-macs must be a fraction in (0, 1]"),
        (["--target-macs", "inf"], "--target-macs must be a finite number"),
        (["--finetune-epochs", "-1"], "--finetune-epochs must be an integer >= 0"),
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--out", ""], "--out is empty"),
        (
            ["--target-macs", "0.5", "--target-params", "0.5"],
            "give one budget, not --target-macs and --target-params",
        ),
    ],
)
def test_cli_search_refuses_bad_options(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["search", "--agent", "random", "--no-progress", "--out", str(out), *args]
    assert cli.main(argv) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"prune-env: error: {message}")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ steps


@pytest.mark.parametrize(
    "returned", ["1.0", None, True, 1 + 2j, float("nan"), float("inf"), np.array([1.0, 2.0])]
)
def test_a_reward_must_return_a_finite_real_number(problem: PruningProblem, returned: Any) -> None:
    env = OneShotPruneEnv(problem=problem, reward=lambda outcome: returned)
    env.reset(seed=0)
    with pytest.raises(RewardError, match="must return a finite"):
        env.step(env.action_space.sample())


@pytest.mark.parametrize("returned", [np.float32(0.5), np.array(0.25), 1])
def test_real_rewards_of_any_numeric_type_pass(problem: PruningProblem, returned: Any) -> None:
    env = OneShotPruneEnv(problem=problem, reward=lambda outcome: returned)
    env.reset(seed=0)
    _, reward, *_ = env.step(env.action_space.sample())
    assert isinstance(reward, float)
    assert reward == float(returned)


@pytest.mark.parametrize("returned", [None, float("nan"), "0.1"])
def test_shaping_rewards_are_checked(problem: PruningProblem, returned: Any) -> None:
    class Shaped:
        def __call__(self, outcome: Any) -> float:
            return outcome.accuracy

        def shape(self, step: Any) -> Any:
            return returned

    env = LayerPruneEnv(problem=problem, reward=Shaped())
    env.reset(seed=0)
    with pytest.raises(RewardError):
        env.step(env.action_space.sample())


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (np.full(1, 0.5 + 0.5j), "must hold real numbers"),
        (np.array([True]), "must hold real numbers"),
        (np.array(["0.5"]), "must hold real numbers"),
        (np.array([np.nan]), "non-finite"),
        (np.zeros(3), "action has shape"),
    ],
)
def test_bad_actions_are_refused(problem: PruningProblem, action: np.ndarray, message: str) -> None:
    for env in (LayerPruneEnv(problem=problem), OneShotPruneEnv(problem=problem)):
        env.reset(seed=0)
        if isinstance(env, OneShotPruneEnv) and action.shape == (1,):
            action = np.resize(action, env.action_space.shape)
        if isinstance(env, OneShotPruneEnv) and message == "action has shape":
            action = np.zeros(env.action_space.shape[0] + 1)
        with pytest.raises(InvalidActionError, match=message):
            env.step(action)


@pytest.mark.parametrize("cls", [OneShotPruneEnv, LayerPruneEnv])
def test_no_step_outside_an_episode(problem: PruningProblem, cls: type) -> None:
    env = cls(problem=problem)
    with pytest.raises(ResetNeeded):
        env.step(env.action_space.sample())  # before the first reset
    env.reset(seed=0)
    terminated = False
    while not terminated:
        *_, terminated, _, _ = env.step(env.action_space.sample())
    evaluations = problem.evaluations
    with pytest.raises(ResetNeeded):
        env.step(env.action_space.sample())  # after termination: nothing is scored again
    assert problem.evaluations == evaluations


def test_reset_target_option_is_checked(problem: PruningProblem) -> None:
    env = OneShotPruneEnv(problem=problem)
    with pytest.raises(InvalidSettingError, match="must be a fraction"):
        env.reset(options={"target": 0})
    with pytest.raises(InvalidSettingError, match="real number"):
        env.reset(options={"target": "0.5"})


def test_problem_settings_next_to_a_problem_are_refused(problem: PruningProblem) -> None:
    with pytest.raises(InvalidSettingError, match="eval_samples, max_ratio would be ignored"):
        OneShotPruneEnv(problem=problem, eval_samples=10, max_ratio=0.5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("dict", "the model returns dict"),
        ("tuple", "the model returns tuple"),
        ("classes", "the dataset has 10 classes"),
        ("double", "torch.float64; prune_env trains and scores in float32"),
        ("half", "torch.float16"),
    ],
)
def test_models_that_are_not_float32_classifiers_are_refused(digits: Any, model: str, message: str) -> None:
    class Net(nn.Module):
        def __init__(self, classes: int = 10) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, classes)

        def forward(self, x: Any) -> Any:
            y = self.fc(self.conv(x).mean((2, 3)))
            return {"dict": {"logits": y}, "tuple": (y, y)}.get(model, y)

    net = Net(7 if model == "classes" else 10)
    net = net.double() if model == "double" else net.half() if model == "half" else net
    with pytest.raises(InvalidSettingError, match=_escaped(message)):
        PruningProblem(net, digits, **QUICK_SCORING)
