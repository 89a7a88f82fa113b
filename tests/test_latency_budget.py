"""Latency as a budget: settings, the projector on predicted latency, the problem, the agents and the CLI.

Nothing here times anything: every latency model is built from a hand-made table (``latency_tables``),
saved where the cache looks for it, so a problem loads it instead of measuring. One of them is deliberately
non-monotone: widths off a multiple of 8 run slower than the next aligned width, as real kernels can.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_output import one_error_line
from latency_tables import handmade_table, ragged, smooth
from quick import QUICK_SCORING
from torch import nn

from agents import search
from agents.allocation import Widths
from prune_env import InvalidRatiosError, InvalidSettingError, build_graph
from prune_env.app import benchmark, cli
from prune_env.budget import BudgetProjector
from prune_env.cache import CACHE_ENV
from prune_env.data import Splits
from prune_env.env import LayerPruneEnv, OneShotPruneEnv
from prune_env.graph import DependencyGraph
from prune_env.latency import (
    LatencyModel,
    LatencySettings,
    Timing,
    save_table,
    table_path,
)
from prune_env.latency.budget import LatencyCheck, LatencyCost
from prune_env.latency.guard import MAX_STEPS, fit_to_measurement
from prune_env.latency.layers import LayerSpec
from prune_env.latency.settings import available_cores
from prune_env.observation import DYNAMIC_FEATURES, LATENCY_FEATURES, STATIC_FEATURES, latency_shares
from prune_env.problem import PruningProblem
from prune_env.settings import ProblemSettings

torch.set_num_threads(1)

QUICK: dict[str, Any] = {**QUICK_SCORING, "progress": False}


@pytest.fixture(scope="module")
def example(digits: Splits) -> torch.Tensor:
    return digits.example_inputs(1)


@pytest.fixture(scope="module")
def graph(untrained_resnet20: nn.Module, example: torch.Tensor) -> DependencyGraph:
    return build_graph(untrained_resnet20, example)


@pytest.fixture(scope="module")
def ragged_cost(untrained_resnet20: nn.Module, example: torch.Tensor, graph: DependencyGraph) -> LatencyCost:
    table = handmade_table(untrained_resnet20, example, ragged, residual_ms=0.05)
    return LatencyCost(LatencyModel(graph, table))


@pytest.fixture(scope="module")
def latency_cache(
    tmp_path_factory: pytest.TempPathFactory, untrained_resnet20: nn.Module, example: torch.Tensor
) -> Iterator[Path]:
    """A cache directory holding the ragged table of resnet20 on digits, where problems look for it."""
    root = tmp_path_factory.mktemp("latency_cache")
    table = handmade_table(untrained_resnet20, example, ragged, residual_ms=0.05)
    save_table(table, table_path(table.meta, root))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def problem(latency_cache: Path, untrained_resnet20: nn.Module, digits: Splits) -> PruningProblem:
    return PruningProblem(untrained_resnet20, digits, target_latency=0.6, **QUICK)


def predicted_ratio(problem: PruningProblem, keep: Any) -> float:
    assert problem.latency is not None
    return float(problem.latency.predict(np.asarray(keep, dtype=np.int64))) / problem.projector.base_cost


# ------------------------------------------------------------------------------------------------ settings


def test_a_latency_target_makes_latency_the_metric() -> None:
    s = ProblemSettings(target_latency=0.7, latency_batch=4)
    assert (s.metric, s.target, s.latency_batch, s.latency_threads) == ("latency", 0.7, 4, 1)
    assert not s.joint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_latency": 0.5, "target_macs": 0.5}, "give one budget, not target_macs and target_latency"),
        (
            {"target_latency": 0.5, "target_params": 0.5},
            "give one budget, not target_params and target_latency",
        ),
        ({"target_latency": 0.0}, "target_latency must be a fraction in \\(0, 1\\]"),
        ({"target_latency": 1.5}, "target_latency must be a fraction"),
        ({"target_latency": True}, "target_latency must be a real number"),
        ({"target_latency": 0.5, "latency_batch": 0}, "latency_batch must be an integer >= 1, got 0"),
        ({"target_latency": 0.5, "latency_batch": 2.0}, "latency_batch must be an integer"),
        ({"target_latency": 0.5, "latency_threads": 0}, "latency_threads must be an integer >= 1"),
        ({"latency_batch": 8}, "latency_batch=8 would be ignored.*give target_latency"),
        ({"target_macs": 0.5, "latency_threads": 2}, "latency_threads=2 would be ignored"),
        ({"target_latency": 0.5, "quantize": True}, "drop quantize"),
        ({"latency_guard": True}, "latency_guard=True would be ignored"),
        ({"target_macs": 0.5, "latency_rounds": 3}, "latency_rounds=3 would be ignored"),
        ({"target_latency": 0.5, "latency_rounds": 0}, "latency_rounds must be an integer >= 1"),
        ({"target_latency": 0.5, "latency_guard": "yes"}, "latency_guard must be"),
    ],
)
def test_bad_latency_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSettingError, match=message):
        ProblemSettings(**kwargs)


def test_search_help_lists_the_latency_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["search", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--target-latency" in text and "--latency-batch" in text and "--latency-threads" in text
    assert "--latency-rounds" in text and "--latency-guard" in text


def test_cli_refuses_two_budgets_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    args = ["search", "--target-latency", "0.5", "--target-macs", "0.5", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 2
    assert "give one budget, not --target-macs and --target-latency" in one_error_line(
        capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "bitops"}, "metric must be one of 'macs', 'params', 'latency', got 'bitops'"),
        ({"problem_kwargs": {"target_latency": 0.5}}, "problem_kwargs sets target_latency"),
    ],
)
def test_the_benchmark_grid_refuses_other_budgets_before_any_work(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    out = tmp_path / "grid"
    with pytest.raises(InvalidSettingError, match=message):
        benchmark.run(agents=["random"], out=out, progress=False, **kwargs)
    assert not out.exists()


def test_the_benchmark_grid_refuses_an_agent_that_cannot_meet_a_latency_budget(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    with pytest.raises(InvalidSettingError, match="agent 'predictor' needs a differentiable"):
        benchmark.run(agents=["uniform", "predictor"], metric="latency", out=out, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ projector


def test_the_ragged_table_is_not_monotone(ragged_cost: LatencyCost, graph: DependencyGraph) -> None:
    full = graph.costs.full_keep()
    aligned = np.minimum(full, 8)
    narrower = aligned.copy()
    narrower[0] = 7  # one channel fewer, off the multiple of 8: slower
    assert ragged_cost.predict(narrower) > ragged_cost.predict(aligned)


def test_projection_on_a_non_monotone_table_terminates_within_budget(
    ragged_cost: LatencyCost, graph: DependencyGraph
) -> None:
    units = [g.units for g in graph.groups]
    projector = BudgetProjector(graph.costs, units, metric="latency", predicted=ragged_cost, max_ratio=0.8)
    assert projector.base_cost == pytest.approx(ragged_cost.full_ms)
    rng = np.random.default_rng(0)
    for target in np.linspace(projector.min_cost_ratio, 1.0, 7):
        limit = float(target) * ragged_cost.full_ms
        for _ in range(6):
            ratios = rng.uniform(0.0, 0.8, len(units))
            for fill in (False, True):
                keep = projector.project(ratios, float(target), fill=fill)
                assert ragged_cost.predict(keep) <= limit  # the exact prediction, no tolerance
                assert np.all((keep >= projector.min_keep) & (keep <= np.array(units)))
            # The action wall, group by group as the layer-wise environment applies it.
            decided = np.array(units, dtype=np.int64)
            for g, r in enumerate(ratios):
                decided[g] = projector.wall(decided, g, float(r), float(target))
            assert ragged_cost.predict(decided) <= limit


def inverted(spec: LayerSpec, w_in: int, w_out: int) -> float:
    """``smooth``, but 6x slower below 30% of a layer's output channels: pruning hard is slower."""
    return smooth(spec, w_in, w_out) * (6.0 if w_out < 0.3 * spec.outputs.full else 1.0)


def test_when_pruning_hard_is_slower_the_fastest_uniform_pruning_is_the_floor(
    untrained_resnet20: nn.Module, example: torch.Tensor, graph: DependencyGraph
) -> None:
    cost = LatencyCost(LatencyModel(graph, handmade_table(untrained_resnet20, example, inverted, 0.05)))
    units = [g.units for g in graph.groups]
    projector = BudgetProjector(graph.costs, units, metric="latency", predicted=cost, max_ratio=0.8)
    at_max_ratio = cost.predict(projector.min_keep) / cost.full_ms
    assert projector.min_cost_ratio < at_max_ratio  # pruning by max_ratio is not the fastest
    assert cost.predict(projector.floor_keep) / cost.full_ms == projector.min_cost_ratio
    rng = np.random.default_rng(2)
    for target in np.linspace(projector.min_cost_ratio, at_max_ratio, 4):
        limit = float(target) * cost.full_ms
        for _ in range(4):
            ratios = rng.uniform(0.0, 0.8, len(units))
            assert cost.predict(projector.project(ratios, float(target), fill=True)) <= limit
            decided = np.array(units, dtype=np.int64)
            for g, r in enumerate(ratios):
                decided[g] = projector.wall(decided, g, float(r), float(target))
            assert cost.predict(decided) <= limit
    with pytest.raises(InvalidSettingError, match=r"max_ratio=0\.8 or any less, uniformly, still leaves"):
        projector.check_target(projector.min_cost_ratio * 0.99)


def test_the_wall_prices_candidates_in_one_batched_prediction(
    ragged_cost: LatencyCost, graph: DependencyGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    units = [g.units for g in graph.groups]
    calls: list[int] = []
    real = ragged_cost.predict

    def counted(keep: Any) -> Any:
        calls.append(np.ndim(keep))
        return real(keep)

    monkeypatch.setattr(ragged_cost, "predict", counted)
    projector = BudgetProjector(graph.costs, units, metric="latency", predicted=ragged_cost)
    calls.clear()
    keep = np.array(units, dtype=np.int64)
    projector.wall(keep, 3, 0.0, 0.9)
    assert calls.count(2) == 1  # one batch; the rest are the exact checks of single vectors


def test_a_latency_projector_needs_its_cost_and_only_it_does(
    ragged_cost: LatencyCost, graph: DependencyGraph
) -> None:
    units = [g.units for g in graph.groups]
    with pytest.raises(InvalidSettingError, match="pass predicted=LatencyCost"):
        BudgetProjector(graph.costs, units, metric="latency")
    with pytest.raises(InvalidSettingError, match="not macs: pass metric='latency'"):
        BudgetProjector(graph.costs, units, metric="macs", predicted=ragged_cost)


# ------------------------------------------------------------------------------------------------ problem


def test_the_problem_uses_the_cached_table_and_reports_predicted_latency(problem: PruningProblem) -> None:
    assert problem.metric == "latency" and problem.projector.metric == "latency"
    keep = problem.uniform_keep()
    assert predicted_ratio(problem, keep) <= 0.6
    outcome = problem.outcome(keep, accuracy=0.5, loss=1.0)
    assert outcome.cost_ratio == outcome.latency_ratio == pytest.approx(predicted_ratio(problem, keep))
    assert problem.latency is not None
    assert outcome.base_latency_ms == pytest.approx(problem.projector.base_cost)
    assert outcome.latency_ms == pytest.approx(float(problem.latency.predict(keep)))
    info = outcome.as_info()
    assert info["latency_ratio"] == outcome.latency_ratio and info["latency_ms"] == outcome.latency_ms
    assert set(outcome.latency_fields()) == {"latency_ms", "base_latency_ms", "latency_ratio"}


def test_a_macs_outcome_has_no_latency(untrained_resnet20: nn.Module, digits: Splits) -> None:
    macs = PruningProblem(untrained_resnet20, digits, target_macs=0.5, **QUICK)
    outcome = macs.outcome(macs.uniform_keep(), accuracy=0.5, loss=1.0)
    assert macs.latency is None and outcome.latency_fields() == {} and "latency_ms" not in outcome.as_info()
    assert np.isnan(outcome.latency_ratio)


def test_an_unreachable_target_is_refused_naming_fraction_and_ms(problem: PruningProblem) -> None:
    floor = problem.projector.min_cost_ratio
    with pytest.raises(InvalidSettingError, match=r"target latency 0\.01 is impossible") as refused:
        problem.check_target(0.01)
    text = str(refused.value)
    assert f"still leaves {floor:.4g}" in text and " ms of the unpruned " in text and "at batch 1" in text
    assert "per-layer overhead" in text


def test_the_overhead_is_named_as_the_floor(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    untrained_resnet20: nn.Module,
    digits: Splits,
    example: torch.Tensor,
) -> None:
    """With most of the latency a constant per-layer overhead, no pruning goes below it: the refusal says
    so, before any proxy is built."""
    table = handmade_table(untrained_resnet20, example, smooth, residual_ms=50.0)
    save_table(table, table_path(table.meta, tmp_path))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    overhead = 50.0 / table.whole.median_ms
    with pytest.raises(InvalidSettingError, match="is the floor: measure at a larger latency_batch"):
        PruningProblem(untrained_resnet20, digits, target_latency=round(overhead * 0.9, 3), **QUICK)


def test_more_latency_threads_than_cores_are_refused_by_the_problems_name(
    latency_cache: Path, untrained_resnet20: nn.Module, digits: Splits
) -> None:
    cores = available_cores()
    with pytest.raises(
        InvalidSettingError, match=f"latency_threads={cores + 1} is more than the {cores} CPU"
    ):
        PruningProblem(untrained_resnet20, digits, target_latency=0.9, latency_threads=cores + 1, **QUICK)


def test_a_latency_problem_measures_its_table_when_none_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: Splits
) -> None:
    """No table in the cache: the problem measures one (a tiny model, a fast protocol) and caches it."""
    from prune_env.latency import settings as latency_settings
    from prune_env.models import get_model

    fast = {"warmup": 0, "repeats": 1, "min_sample_ms": 0.0, "max_attempts": 1, "grid_points": 2}
    real = latency_settings.LatencySettings.__post_init__

    def quick(self: LatencySettings) -> None:
        for name, value in fast.items():
            object.__setattr__(self, name, value)
        real(self)

    monkeypatch.setattr(latency_settings.LatencySettings, "__post_init__", quick)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    torch.manual_seed(0)
    tiny = get_model("tiny", digits.num_classes, digits.in_channels).eval()
    problem = PruningProblem(tiny, digits, target_latency=1.0, **QUICK)
    assert problem.latency is not None and problem.projector.base_cost > 0
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1


# ------------------------------------------------------------------------------------------------ agents


@pytest.mark.parametrize("name", ["uniform", "global", "knapsack", "random", "rlpruner"])
def test_agents_meet_the_latency_budget(problem: PruningProblem, name: str) -> None:
    result = search(name, problem, 3, seed=0)
    assert result.history
    for e in result.history:
        assert predicted_ratio(problem, e.keep) <= problem.target
        assert np.all(np.asarray(e.keep) >= 1)
    if name in ("uniform", "global", "knapsack"):  # they spend the budget
        assert predicted_ratio(problem, result.history[-1].keep) >= 0.8 * problem.target


def test_the_predictor_refuses_a_latency_budget_naming_the_agents_that_meet_it(
    problem: PruningProblem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = problem.evaluations
    with pytest.raises(InvalidSettingError, match=r"search a latency budget with .*evolution.*knapsack"):
        search("predictor", problem, 4, seed=0)
    assert problem.evaluations == before
    out = tmp_path / "never"
    args = ["search", "--agent", "predictor", "--target-latency", "0.9", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 2  # refused in the preflight, before a base model is trained
    assert "a latency table is not" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_rlpruner_rounds_are_refused_under_a_latency_budget(problem: PruningProblem) -> None:
    with pytest.raises(InvalidSettingError, match="a latency budget takes rounds=1"):
        search("rlpruner", problem, 4, seed=0, rounds=2)


def test_allocation_widths_price_latency(problem: PruningProblem) -> None:
    widths = Widths(problem)
    keeps = np.stack([widths.floor, widths.units])
    np.testing.assert_allclose(widths.costs(keeps), [predicted_ratio(problem, k) for k in keeps], rtol=1e-12)


def test_the_layerwise_env_stays_within_a_latency_budget(problem: PruningProblem) -> None:
    env = LayerPruneEnv(problem=problem, budget_range=(0.5, 0.9))
    rng = np.random.default_rng(1)
    for episode in range(3):
        env.reset(seed=episode)
        done = False
        info: dict[str, Any] = {}
        while not done:
            _, _, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
            done = terminated or truncated
        assert env.last_outcome is not None
        assert env.last_outcome.cost_ratio <= env.target * (1 + 1e-12)
        assert info["latency_ratio"] == env.last_outcome.latency_ratio


def test_the_observation_shows_each_groups_share_of_the_predicted_latency(problem: PruningProblem) -> None:
    shares = latency_shares(problem)
    layer = LayerPruneEnv(problem=problem)
    obs, _ = layer.reset(seed=0)
    n_static = len(STATIC_FEATURES) + len(LATENCY_FEATURES)
    assert layer.observation_space.shape == (n_static + len(DYNAMIC_FEATURES),)
    assert layer.observation_space.contains(obs)
    assert obs[n_static - 1] == np.float32(np.clip(shares[0], 0.0, 1.0))
    one_shot = OneShotPruneEnv(problem=problem)
    flat, _ = one_shot.reset(seed=0)
    assert one_shot.observation_space.shape == (problem.n_groups * n_static + 1,)
    assert one_shot.observation_space.contains(flat)
    np.testing.assert_array_equal(
        flat[:-1].reshape(problem.n_groups, n_static)[:, -1], np.clip(shares, 0, 1).astype(np.float32)
    )
    assert shares.max() > 0  # pruning a group saves predicted latency
    lone = problem.units.copy()
    lone[0] = 1
    assert shares[0] == pytest.approx(1 - predicted_ratio(problem, lone))


def test_a_cli_search_under_a_latency_target_never_exceeds_it(
    latency_cache: Path, tmp_path: Path, untrained_resnet20: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prune-env search --target-latency`: the table the preflight checks the target with (the untrained
    architecture's) is the one the problem then loads, and every evaluation's predicted latency fits."""
    weights = tmp_path / "resnet20.pt"
    torch.save(untrained_resnet20.state_dict(), weights)
    out = tmp_path / "run"
    args = [
        "search", "--model", "resnet20", "--dataset", "digits", "--weights", str(weights),
        "--target-latency", "0.7", "--evals", "3", "--agent", "random", "--finetune-epochs", "0",
        "--eval-samples", "96", "--bn-recalib-batches", "1", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "latency" and results["latency_ratio"] <= 0.7
    assert results["latency_ms"] <= 0.7 * results["base_latency_ms"]
    for line in (out / "evaluations.csv").read_text().splitlines()[1:]:
        keep = [int(k) for k in line.split(",")[-1].split()]
        assert len(keep) == len(results["keep"])
    err = capsys.readouterr().err
    assert "latency ratio" in err
    assert len(list((latency_cache / "latency").glob("*.json"))) == 1  # nothing measured anew
    # The saved model is measured beside the prediction, and the base model with it.
    assert results["latency_predicted_ms"] == results["latency_ms"]
    measured, base = results["latency_measured_ms"], results["base_latency_measured_ms"]
    assert measured > 0 and base > 0 and results["latency_measured_repeats"] >= 1
    assert results["measured_speedup"] == pytest.approx(base / measured)
    assert results["latency_prediction_error"] == pytest.approx((results["latency_ms"] - measured) / measured)
    assert "measured latency" in err


def test_check_latency_measures_the_pruned_model_against_its_prediction(problem: PruningProblem) -> None:
    keep = problem.uniform_keep()
    model = problem.build(keep)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = problem.check_latency(keep, model)
    assert check.predicted_ms == pytest.approx(predicted_ratio(problem, keep) * problem.projector.base_cost)
    assert check.measured.median_ms > 0 and check.base_measured.median_ms > 0
    assert check.speedup == pytest.approx(check.base_measured.median_ms / check.measured.median_ms)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # measured, not changed


def test_check_latency_refuses_a_problem_without_a_table_and_a_bad_keep(
    problem: PruningProblem, untrained_resnet20: nn.Module, digits: Splits
) -> None:
    macs = PruningProblem(untrained_resnet20, digits, target_macs=0.5, **QUICK)
    with pytest.raises(InvalidSettingError, match="budgets macs, not latency"):
        macs.check_latency(macs.uniform_keep(), macs.build(macs.uniform_keep()))
    with pytest.raises(InvalidRatiosError, match="one integer count per group"):
        problem.check_latency(problem.units[:-1], untrained_resnet20)


def test_a_latency_cost_refuses_settings_the_table_was_not_measured_with(ragged_cost: LatencyCost) -> None:
    meta = ragged_cost.model.table.meta
    assert (ragged_cost.settings.batch, ragged_cost.settings.threads) == (meta.batch, meta.threads)
    with pytest.raises(InvalidSettingError, match="the table was measured at batch"):
        LatencyCost(ragged_cost.model, LatencySettings(batch=meta.batch + 1, threads=meta.threads))


def test_a_latency_grid_records_predicted_and_measured_latency(
    latency_cache: Path, tmp_path: Path, untrained_resnet20: nn.Module, digits: Splits
) -> None:
    """The harness under a latency budget: every run within the predicted budget, its final model measured,
    and the report's table showing the measured milliseconds and speed-up."""
    results = benchmark.run(
        agents=["uniform", "global"], models=[untrained_resnet20], datasets=[digits], targets=[0.7],
        metric="latency", seeds=[0], evals=2, finetune_epochs=0, problem_kwargs=QUICK, progress=False,
        out=tmp_path / "grid",
    )  # fmt: skip
    assert [r["agent"] for r in results.runs] == ["uniform", "global"]
    for row in results.runs:
        assert row["metric"] == "latency" and row["latency_ratio"] <= 0.7
        assert row["latency_measured_ms"] > 0 and row["base_latency_measured_ms"] > 0
        assert row["measured_speedup"] == pytest.approx(
            row["base_latency_measured_ms"] / row["latency_measured_ms"]
        )
    header = (tmp_path / "grid" / "runs.csv").read_text().splitlines()[0].split(",")
    assert {"latency_ratio", "latency_measured_ms", "measured_speedup"} <= set(header)
    again = benchmark.BenchmarkResults.load(tmp_path / "grid")
    assert again.runs[0]["latency_measured_noisy"] in (0, 1)
    table = again.table()
    assert "speed-up" in table and "ms (meas.)" in table
    assert "final models above the target beyond their measurement's spread" in again.verdicts()


# ------------------------------------------------------------------------------------------------ guard


@pytest.fixture
def slower_than_predicted(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Measurements made up: every pruned model runs ``factor[0]`` times its predicted milliseconds, the
    unpruned model exactly its own (a table that under-prices pruned models, as a search finds)."""
    factor = [1.2]

    def check(
        self: LatencyCost,
        keep: np.ndarray,
        pruned: nn.Module,
        base: nn.Module,
        example_inputs: Any,
        rounds: int = 1,
    ) -> LatencyCheck:
        predicted = float(self.predict(np.asarray(keep)))
        ms, full = predicted * factor[0], self.full_ms
        return LatencyCheck(
            predicted,
            Timing(median_ms=ms, min_ms=ms, iqr_ms=0.0, repeats=1),
            Timing(median_ms=full, min_ms=full, iqr_ms=0.0, repeats=1),
        )

    monkeypatch.setattr(LatencyCost, "check", check)
    return factor


def test_the_guard_reprojects_a_policy_that_measures_above_its_target(
    problem: PruningProblem, slower_than_predicted: list[float]
) -> None:
    """Measured 20% above its prediction, the chosen policy is projected onto the target / 1.2 and then
    measures within the target; its preferences survive (every group keeps at most what it kept)."""
    chosen = search("random", problem, 2, seed=0).best_keep
    fit = problem.fit_latency(chosen)
    assert fit.measured_ratios[0] == pytest.approx(1.2 * predicted_ratio(problem, chosen))
    assert fit.measured_ratios[0] > problem.target  # the premise: it ran slower than the target
    assert fit.within and fit.stopped == "within" and fit.steps >= 1
    assert fit.measured_ratios[-1] <= problem.target
    # The budget the chosen policy would have met, were the table's error proportional: target / 1.2.
    assert fit.budgets[0] == problem.target and fit.budgets[1] == pytest.approx(problem.target / 1.2)
    assert predicted_ratio(problem, fit.keep) <= fit.budgets[-1]
    assert np.all(fit.keep <= chosen) and np.any(fit.keep < chosen) and np.all(fit.keep >= 1)
    fields = fit.fields()
    assert fields["latency_guard_steps"] == fit.steps and fields["latency_guard_within"] is True
    assert fields["latency_measured_ms"] == fit.check.measured.median_ms


def test_the_guard_keeps_a_policy_within_its_tolerance_and_stops_at_the_floor(
    problem: PruningProblem, slower_than_predicted: list[float]
) -> None:
    chosen = problem.uniform_keep()
    slower_than_predicted[0] = 1.0  # measured as predicted: nothing to do
    fit = problem.fit_latency(chosen)
    assert (fit.steps, fit.stopped, fit.budgets) == (0, "within", (problem.target,))
    np.testing.assert_array_equal(fit.keep, chosen)
    slower_than_predicted[0] = 20.0  # no policy the projection can reach runs that fast
    fit = problem.fit_latency(chosen)
    assert not fit.within and fit.stopped in ("floor", "steps")
    assert fit.steps <= MAX_STEPS and min(fit.budgets) >= problem.projector.min_cost_ratio
    assert predicted_ratio(problem, fit.keep) <= fit.budgets[-1] * (1 + 1e-9) and np.all(fit.keep >= 1)
    within = fit_to_measurement(
        chosen,
        0.5,
        0.1,
        lambda k: replace(fit.check, base_measured=fit.check.measured),
        lambda k, b: k,
        0.1,
        1.0,
    )  # measured at 1.0 of a 0.5 target: the projection changes nothing, so it stops
    assert within.stopped == "floor" and within.steps == 0
    disturbed = replace(fit.check, measured=replace(fit.check.measured, noisy=True))
    fit = fit_to_measurement(chosen, 0.5, 0.0, lambda k: disturbed, lambda k, b: k // 2, 0.1, 1.0)
    assert (fit.stopped, fit.steps) == ("disturbed", 0)  # another process's load is not acted on
    np.testing.assert_array_equal(fit.keep, chosen)
    with pytest.raises(ValueError, match="tolerance"):
        fit_to_measurement(chosen, 0.5, -0.1, lambda k: fit.check, lambda k, b: k, 0.1, 1.0)


def test_a_cli_search_with_the_latency_guard_saves_and_reports_the_reprojected_model(
    latency_cache: Path,
    tmp_path: Path,
    untrained_resnet20: nn.Module,
    slower_than_predicted: list[float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    weights = tmp_path / "resnet20.pt"
    torch.save(untrained_resnet20.state_dict(), weights)
    out = tmp_path / "run"
    args = [
        "search", "--model", "resnet20", "--dataset", "digits", "--weights", str(weights),
        "--target-latency", "0.7", "--latency-guard", "--evals", "3", "--agent", "random",
        "--finetune-epochs", "0", "--eval-samples", "96", "--bn-recalib-batches", "1", "--out", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["latency_guard_steps"] >= 1 and results["latency_guard_within"] == 1
    assert results["latency_ratio"] <= 0.7 / 1.2 + 1e-9  # the saved model's, re-projected
    assert results["proxy_accuracy"] is None and results["policy_applied"] is False
    searched, saved = results["searched_keep"], results["keep"]
    assert saved != searched and all(saved[g] <= searched[g] for g in saved)
    assert results["latency_predicted_ms"] == pytest.approx(results["latency_ms"])
    assert results["latency_measured_ms"] / results["base_latency_measured_ms"] <= 0.7
    assert "latency guard: measured" in capsys.readouterr().err
    assert "latency_guard" not in json.dumps(results["settings"])  # may change when the run resumes


def test_a_latency_grid_with_the_guard_records_the_searched_and_the_final_policy(
    latency_cache: Path, tmp_path: Path, untrained_resnet20: nn.Module, digits: Splits,
    slower_than_predicted: list[float],
) -> None:  # fmt: skip
    results = benchmark.run(
        agents=["uniform"], models=[untrained_resnet20], datasets=[digits], targets=[0.7], metric="latency",
        seeds=[0], evals=2, finetune_epochs=0, problem_kwargs={**QUICK, "latency_guard": True},
        progress=False, out=tmp_path / "grid",
    )  # fmt: skip
    again = benchmark.BenchmarkResults.load(tmp_path / "grid").runs[0]
    for row in (results.runs[0], again):
        assert row["latency_guard_steps"] >= 1 and row["latency_guard_within"] == 1
        assert row["latency_guard_stopped"] == "within" and row["latency_measured_rounds"] == 1
        searched = [int(k) for k in row["searched_keep"].split()]
        final = [int(k) for k in row["keep"].split()]
        assert final != searched and all(f <= s for f, s in zip(final, searched, strict=True))
        assert row["latency_ratio"] <= 0.7 / 1.2 + 1e-9


def test_check_latency_takes_the_median_of_its_rounds(problem: PruningProblem) -> None:
    keep = problem.uniform_keep()
    check = problem.check_latency(keep, problem.build(keep), rounds=3)
    assert len(check.round_ratios) == 3 and list(check.round_ratios) == sorted(check.round_ratios)
    assert check.measured_ratio == check.round_ratios[1]
    assert check.fields()["latency_measured_rounds"] == 3
    assert problem.check_latency(keep, problem.build(keep)).round_ratios == ()  # latency_rounds=1
    with pytest.raises(InvalidSettingError, match="latency_rounds"):
        problem.check_latency(keep, problem.build(keep), rounds=0)
