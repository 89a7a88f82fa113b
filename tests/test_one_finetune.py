"""One final fine-tune for the harness and every benchmark script: a policy fine-tuned through a script's own
code path scores exactly what :func:`prune_env.app.finetune_recipe.finetune_accuracy` gives it (same start
weights, training subset and seeds), so numbers from different scripts compare."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from benchmark_scripts import load_script
from torch import nn

from prune_env.app.finetune_recipe import finetune_accuracy
from prune_env.app.measure import this_invocation
from prune_env.data import Splits
from prune_env.errors import InvalidRatiosError, InvalidSettingError
from prune_env.problem import PruningProblem
from prune_env.quantization import BitPlan
from prune_env.settings import ProblemSettings

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
EPOCHS, SAMPLES = 1, 120  # a tiny fine-tune: the recipe, not the accuracy, is under test
TUNE = argparse.Namespace(finetune_epochs=EPOCHS, finetune_samples=SAMPLES)


@pytest.fixture(scope="module")
def finetune_start() -> ModuleType:
    # It imports proxy_fidelity.py from beside it, as it does when run as a script.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        return load_script("finetune_start")


@pytest.fixture(scope="module")
def problem(digits_base: tuple[nn.Module, dict[str, float]], digits: Splits) -> PruningProblem:
    return PruningProblem(
        digits_base[0], digits, ProblemSettings(target_macs=0.3, eval_samples=100, progress=False)
    )


@pytest.fixture(scope="module")
def keep(problem: PruningProblem) -> np.ndarray:
    """One fixed policy, deep enough that where its fine-tune starts shows in its accuracy."""
    return problem.keep_for(np.linspace(0.0, 0.8, problem.n_groups))


@pytest.fixture(scope="module")
def harness(problem: PruningProblem, keep: np.ndarray) -> tuple[float, float]:
    return finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=0)


def test_another_start_subset_or_seed_scores_differently(
    problem: PruningProblem, keep: np.ndarray, harness: tuple[float, float]
) -> None:
    """What makes the equalities below worth asserting: a script with its own start weights, training
    subset or seed would not reproduce the harness's numbers on this policy."""
    assert finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=0) == harness  # deterministic
    assert finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=0, start="pruned") != harness
    assert finetune_accuracy(problem, keep, EPOCHS, 2 * SAMPLES, seed=0) != harness
    assert finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=1) != harness


def test_allocation_spread_scores_a_policy_as_the_harness(
    problem: PruningProblem, keep: np.ndarray, harness: tuple[float, float]
) -> None:
    row = load_script("allocation_spread").tuned(problem, keep, EPOCHS, SAMPLES, 0)
    assert (row["val_accuracy"], row["test_accuracy"]) == harness
    assert row["epochs"] == EPOCHS


def test_agents_benchmark_scores_a_policy_as_the_harness(
    problem: PruningProblem, keep: np.ndarray, harness: tuple[float, float]
) -> None:
    row = load_script("compare_agents").final_scores(problem, keep, TUNE, 0)
    assert (row["finetuned_val_accuracy"], row["finetuned_test_accuracy"]) == harness


def test_budget_conditioned_scores_a_policy_as_the_harness(
    problem: PruningProblem, keep: np.ndarray, harness: tuple[float, float]
) -> None:
    row = load_script("budget_conditioned").row_for("m", problem, keep, TUNE, 0, 0, time.perf_counter())
    assert (row["val_accuracy"], row["test_accuracy"]) == harness
    assert row["keep"] == keep.tolist()


def test_finetune_start_reference_arm_is_the_harness(
    finetune_start: ModuleType, problem: PruningProblem, keep: np.ndarray, harness: tuple[float, float]
) -> None:
    arms = finetune_start.compare_starts(problem, keep, EPOCHS, SAMPLES, [0, 1])
    assert arms["from_proxy"] == [
        harness[1],
        finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=1)[1],
    ]
    # The other arm changes the start only: the harness's recipe from the pruned base model.
    assert arms["from_base"] == [
        finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=s, start="pruned")[1] for s in (0, 1)
    ]


def test_joint_quantization_scores_a_joint_policy_as_the_harness(
    digits_base: tuple[nn.Module, dict[str, float]], digits: Splits
) -> None:
    joint = PruningProblem(
        digits_base[0], digits, ProblemSettings(target_bitops=0.01, eval_samples=100, progress=False)
    )
    n = joint.n_groups
    keep, w, a = joint.joint_keep_for(np.linspace(0.0, 0.8, n), np.full(n, 3), np.full(n, 4))
    assert joint.joint is not None
    plan = joint.joint.plan(w, a)
    row = load_script("joint_quantization").final_accuracy(joint, keep, plan, TUNE, 1)
    quantized = finetune_accuracy(joint, keep, EPOCHS, SAMPLES, seed=1, plan=plan)
    assert (row["val_accuracy"], row["test_accuracy"]) == quantized
    # The bits are applied: the same fine-tune left in floating point scores otherwise.
    assert finetune_accuracy(joint, keep, EPOCHS, SAMPLES, seed=1) != quantized
    assert 0 < row["bitops_ratio"] <= 0.01 + 1e-9


def test_finetune_start_command_measures_saved_policies_with_the_harness(
    finetune_start: ModuleType, cached: Path, tmp_path: Path
) -> None:
    saved = {"dataset": "digits", "model": "resnet20", "seed": 0, "budget": 0.5, "eval_samples": 100,
             "finetune_epochs": EPOCHS, "finetune_samples": SAMPLES, "truth_seeds": 1, "skip": 0}  # fmt: skip
    problem = finetune_start.start_problem(saved, "recalibration")
    policies = [[0.3] * problem.n_groups, [0.5] * problem.n_groups]
    truth = [{"policy": i, "ratios": r, "proxies": {}, "truth_seeds": [0]} for i, r in enumerate(policies)]
    (tmp_path / "truth.json").write_text(json.dumps({"args": saved, "rows": truth}))
    out = tmp_path / "start.json"
    finetune_start.main(
        ["--truth-from", str(tmp_path / "truth.json"), "--proxy", "recalibration", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["recipe"] == finetune_start.FINETUNE_RECIPE
    assert result["provenance"] == [this_invocation()]
    assert [row["policy"] for row in result["rows"]] == [0, 1]
    for row, ratios in zip(result["rows"], policies, strict=True):
        keep = problem.unprojected_keep(ratios)
        assert row["from_proxy"] == [finetune_accuracy(problem, keep, EPOCHS, SAMPLES, seed=0)[1]]
    # Files of the earlier recipe (base arm: the ground truth's own fine-tune) are not reported with these.
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps({"args": {"proxy": "supernet"}, "rows": [{"from_proxy": [0.9], "from_base": [0.8]}]})
    )
    with pytest.raises(SystemExit):
        finetune_start.main(["--report", str(out), str(old)])


def test_scripts_refuse_to_extend_results_of_their_earlier_recipe(tmp_path: Path) -> None:
    spread = tmp_path / "spread.json"
    spread.write_text(json.dumps({"args": {}, "rows": []}))  # written before the recipe was recorded
    with pytest.raises(SystemExit, match="earlier fine-tune recipe"):
        load_script("allocation_spread").main(["--dataset", "digits", "--out", str(spread)])
    joint = tmp_path / "joint.json"
    joint.write_text(json.dumps({"args": {}, "rows": []}))
    with pytest.raises(SystemExit, match="earlier fine-tune recipe"):
        load_script("joint_quantization").main(["--dataset", "digits", "--out", str(joint)])


@pytest.mark.parametrize("name", ["allocation_spread", "finetune_start"])
def test_scripts_that_import_the_harness_run_as_scripts(name: str) -> None:
    """Run as a script, benchmarks/ comes first on sys.path, where agents.py would shadow the ``agents``
    package the harness imports."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout


def test_finetune_accuracy_refuses_bad_arguments(problem: PruningProblem, keep: np.ndarray) -> None:
    with pytest.raises(InvalidRatiosError, match="one integer count per group"):
        finetune_accuracy(problem, keep[:-1], EPOCHS, SAMPLES)
    with pytest.raises(InvalidRatiosError, match="one integer count per group"):
        finetune_accuracy(problem, keep.astype(float), EPOCHS, SAMPLES)
    zero = keep.copy()
    zero[0] = 0  # a group left with no channel
    with pytest.raises(InvalidRatiosError, match="one integer count per group"):
        finetune_accuracy(problem, zero, EPOCHS, SAMPLES)
    with pytest.raises(InvalidRatiosError, match="one integer count per group"):
        finetune_accuracy(problem, problem.units + 1, EPOCHS, SAMPLES)
    with pytest.raises(InvalidSettingError, match="finetune_epochs"):
        finetune_accuracy(problem, keep, -1, SAMPLES)
    with pytest.raises(InvalidSettingError, match="finetune_samples"):
        finetune_accuracy(problem, keep, EPOCHS, 0)
    with pytest.raises(InvalidSettingError, match="start must be"):
        finetune_accuracy(problem, keep, EPOCHS, SAMPLES, start="base")
    with pytest.raises(InvalidSettingError, match="plan must be a BitPlan"):
        finetune_accuracy(problem, keep, EPOCHS, SAMPLES, plan={"conv1": 4})  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match="no-such-layer"):
        finetune_accuracy(problem, keep, EPOCHS, SAMPLES, plan=BitPlan({"no-such-layer": 4}))
