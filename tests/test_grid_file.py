"""A grid fixed in advance: the committed grid file is the one the project's grid asks for, chunks can
only pick parts of it, and a directory cannot mix two versions of it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchmark_scripts import load_script
from latency_tables import handmade_table, smooth

from prune_env.app.measure import this_invocation
from prune_env.app.results import latency_lines
from prune_env.cache import CACHE_ENV
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError
from prune_env.latency import save_table, table_path
from prune_env.models import get_model

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "grids" / "allocation_baselines_fashion.json"
LATENCY_GRID = ROOT / "benchmarks" / "grids" / "latency_baselines_fashion.json"


@pytest.fixture(scope="module")
def grid_script() -> ModuleType:
    return load_script("grid")


def test_the_committed_grid_is_the_one_fixed_in_advance(grid_script: ModuleType) -> None:
    grid = grid_script.read_grid(GRID)
    assert grid["dataset"] == "fashion-mnist" and grid["evals"] == 1000
    assert grid["problem"]["proxy"] == "supernet" and grid["finetune_epochs"] == 6
    settings = {(s["model"], s["metric"], s["target"]) for s in grid["settings"]}
    assert settings == {
        ("vgg11_quarter", "macs", 0.05),
        ("vgg11_quarter", "macs", 0.10),
        ("vgg11_quarter", "params", 0.05),
        ("mobilenetv2_half", "macs", 0.10),
    }
    five = {"uniform", "global", "knapsack", "sensitivity", "random", "ppo"}
    assert {a for a, seeds in grid["agents"].items() if len(seeds) == 5} == five
    assert {a for a, seeds in grid["agents"].items() if len(seeds) == 3} == set(grid["cut_first"])


def test_the_committed_latency_grid_is_the_one_fixed_in_advance(grid_script: ModuleType) -> None:
    from agents.registry import resolve_agent
    from prune_env.settings import ProblemSettings

    grid = grid_script.read_grid(LATENCY_GRID)
    assert grid["dataset"] == "fashion-mnist" and grid["evals"] == 1000 and grid["finetune_epochs"] == 6
    problem = ProblemSettings.from_kwargs({**grid["problem"], "target_latency": 0.4})  # batch 32, one thread
    assert (problem.latency_batch, problem.latency_threads, problem.proxy) == (32, 1, "supernet")
    settings = [(s["model"], s["metric"], s["target"]) for s in grid["settings"]]
    assert settings[:2] == [("mobilenetv2_half", "latency", 0.40), ("vgg11_quarter", "latency", 0.40)]
    assert set(settings[2:]) == {("mobilenetv2_half", "latency", 0.60), ("vgg11_quarter", "latency", 0.60)}
    five = {"uniform", "global", "knapsack", "sensitivity", "random", "ppo"}
    assert {a for a, seeds in grid["agents"].items() if len(seeds) == 5} == five
    assert {a for a, seeds in grid["agents"].items() if len(seeds) == 3} == set(grid["cut_first"])
    assert all(resolve_agent(a).latency_budget for a in grid["agents"])  # every agent meets a latency budget


def _write(path: Path, **changes: object) -> Path:
    grid = json.loads(GRID.read_text())
    grid.update(changes)
    path.write_text(json.dumps(grid))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"evals_": 10}, r"unknown keys \['evals_'\]"),
        ({"evals": "1000"}, "'evals' must be a int"),
        (
            {"settings": [{"name": "a", "model": "vgg11_quarter", "metric": "macs"}]},
            r"missing keys \['target'\]",
        ),
        ({"agents": {"ppo": []}}, "non-empty list of int seeds"),
    ],
)
def test_a_grid_file_with_a_wrong_key_is_refused(
    grid_script: ModuleType, tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(InvalidSettingError, match=message):
        grid_script.read_grid(_write(tmp_path / "grid.json", **changes))


def test_a_chunk_names_only_parts_of_the_file(grid_script: ModuleType, tmp_path: Path) -> None:
    for option in (["--agents", "a2c"], ["--settings", "vgg11_quarter-macs-0.20"], ["--seeds", "7"]):
        with pytest.raises(SystemExit) as stop:
            grid_script.main([str(GRID), "--out", str(tmp_path / "out"), *option])
        assert stop.value.code == 2
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_directory_holds_one_version_of_a_grid_file(grid_script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _write(tmp_path / "grid.json")
    grid_script.record_grid(out, first, first.read_bytes())
    grid_script.record_grid(out, first, first.read_bytes())  # the same file: accepted
    changed = _write(tmp_path / "grid.json", evals=500)
    with pytest.raises(InvalidSettingError, match="its settings changed after runs were made"):
        grid_script.record_grid(out, changed, changed.read_bytes())
    recorded = json.loads((out / "grid.json").read_text())
    assert recorded["grid"]["evals"] == 1000
    assert recorded["provenance"] == [this_invocation()]  # which code fixed the grid in this directory


def test_a_small_grid_runs_in_chunks_and_reports(
    grid_script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _write(
        tmp_path / "grid.json",
        dataset="digits",
        evals=3,
        finetune_epochs=1,  # fine-tuned runs have validation and test accuracies to pair
        finetune_samples=100,
        problem={"proxy": "recalibration", "max_ratio": 0.8, "eval_samples": 64},
        settings=[{"name": "small", "model": "resnet20", "metric": "macs", "target": 0.5}],
        agents={"uniform": [0, 1], "random": [0, 1]},
        cut_first=[],
    )
    out = tmp_path / "out"
    grid_script.main([str(grid), "--out", str(out), "--agents", "uniform", "--no-progress"])
    grid_script.main([str(grid), "--out", str(out), "--agents", "random", "--no-progress"])
    assert (out / "small" / "uniform" / "runs.csv").exists() and (
        out / "small" / "random" / "runs.csv"
    ).exists()
    capsys.readouterr()
    grid_script.main([str(grid), "--out", str(out), "--report"])
    printed = capsys.readouterr().out
    assert "resnet20 on digits, macs budget" in printed and "revisions: " in printed
    paired = (out / "paired.csv").read_text().splitlines()
    assert paired[0].startswith("model,dataset,metric,target,agent,reference")
    assert any(",random,uniform," in line for line in paired[1:])  # random against uniform, paired
    allocations = (out / "small" / "allocations.csv").read_text().splitlines()
    assert allocations[0] == "agent,group,runs,mean_ratio,min_ratio,max_ratio"
    assert (out / "small" / "allocations.png").read_bytes()[:4] == b"\x89PNG"


def test_settings_that_differ_only_by_metric_are_told_apart_in_the_table() -> None:
    from prune_env.app.report import table_text

    def row(metric: str, accuracy: float) -> dict[str, Any]:
        values = {c: accuracy for c in ("best_accuracy", "macs_ratio", "params_ratio", "seconds")}
        values |= {"val_accuracy": accuracy, "test_accuracy": accuracy}
        return {"model": "vgg", "dataset": "fm", "metric": metric, "target": 0.05, "agent": "uniform",
                "seeds": 1, "evals": 1.0, **values, **{f"{k}_std": float("nan") for k in values}}  # fmt: skip

    lines = table_text([row("macs", 0.91), row("params", 0.92)], [], ["uniform"]).splitlines()
    header = lines[0].split()
    assert header[:4] == ["model", "dataset", "metric", "target"]
    val_rows = [line.split() for line in lines[2:] if " val " in line]
    assert [(r[2], r[-2]) for r in val_rows] == [("macs", "0.9100"), ("params", "0.9200")]


def test_the_final_models_of_a_latency_grid_are_measured_again_alone(
    grid_script: ModuleType,
    tmp_path: Path,
    cached: Path,
    digits: Splits,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--remeasure`` measures each run's final model (its own kept counts) beside the unpruned model, once:
    a second pass measures nothing again; the report prints the verdicts of both measurements."""
    cache = tmp_path / "cache"
    shutil.copytree(cached / "base", cache / "base")  # the trained resnet20, and a hand-made table beside it
    model = get_model("resnet20", digits.num_classes, digits.in_channels)
    table = handmade_table(model, digits.example_inputs(1), smooth, residual_ms=0.05)
    table = dataclasses.replace(table, noise=0.25)
    save_table(table, table_path(table.meta, cache))
    monkeypatch.setenv(CACHE_ENV, str(cache))
    grid = _write(
        tmp_path / "grid.json",
        dataset="digits",
        evals=2,
        finetune_epochs=0,
        finetune_samples=100,
        problem={"proxy": "recalibration", "max_ratio": 0.8, "eval_samples": 64, "latency_batch": 1},
        settings=[{"name": "fast", "model": "resnet20", "metric": "latency", "target": 0.7}],
        agents={"uniform": [0], "global": [0]},
        cut_first=[],
    )
    out = tmp_path / "out"
    grid_script.main([str(grid), "--out", str(out), "--no-progress"])
    grid_script.main([str(grid), "--out", str(out), "--remeasure", "--rounds", "3", "--no-progress"])
    written = out / "fast" / "latency_remeasured.json"
    first = written.read_bytes()
    again = json.loads(first)["runs"]
    runs = {r["agent"]: r for r in grid_script.setting_results(out, {"name": "fast"}, False).runs}
    assert sorted(r["agent"] for r in again) == ["global", "uniform"]
    for r in again:
        assert r["keep"] == runs[r["agent"]]["keep"]  # the run's own final model
        assert r["latency_measured_ms"] > 0 and r["base_latency_measured_ms"] > 0
        assert r["latency_protocol_noise"] == 0.25 and len(r["load_before"]) == 3
        ratio = r["latency_measured_ms"] / r["base_latency_measured_ms"]
        assert r["rounds"] == 3 and r["round_ratios"][1] == pytest.approx(ratio)  # the median round kept
        assert r["round_ratios"] == sorted(r["round_ratios"])
    grid_script.main([str(grid), "--out", str(out), "--remeasure", "--rounds", "3", "--no-progress"])
    assert written.read_bytes() == first  # every run measured already: nothing measured twice
    with pytest.raises(SystemExit) as stop:  # a file of 3-round measurements is not completed with 1
        grid_script.main([str(grid), "--out", str(out), "--remeasure", "--no-progress"])
    assert stop.value.code == 2 and "pass --rounds 3 to complete it" in capsys.readouterr().err
    for wrong in (["--remeasure", "--rounds", "0"], ["--rounds", "2"], ["--report", "--rounds", "2"]):
        with pytest.raises(SystemExit) as stop:
            grid_script.main([str(grid), "--out", str(out), *wrong])
        assert stop.value.code == 2 and "--rounds is a positive count" in capsys.readouterr().err
    # The latency guard applied to the same final models: its steps, every measured ratio, where it ended.
    grid_script.main([str(grid), "--out", str(out), "--remeasure", "--guard", "--no-progress"])
    guarded = json.loads((out / "fast" / "latency_guarded.json").read_text())["runs"]
    assert sorted(r["agent"] for r in guarded) == ["global", "uniform"]
    for r in guarded:
        assert r["keep"] == runs[r["agent"]]["keep"] and r["latency_guard_tolerance"] == 0.25
        ratios = [float(x) for x in r["latency_guard_measured_ratios"].split()]
        assert len(ratios) == r["latency_guard_steps"] + 1 and len(r["load_before"]) == 3
        assert r["latency_guard_within"] == int(ratios[-1] <= 0.7 * 1.25)
        assert r["guarded_latency_ratio"] <= 0.7 + 1e-9
        assert (r["guarded_keep"] == r["keep"]) == (r["latency_guard_steps"] == 0)
    with pytest.raises(SystemExit) as stop:
        grid_script.main([str(grid), "--out", str(out), "--guard"])
    assert stop.value.code == 2 and "add --remeasure" in capsys.readouterr().err
    grid_script.main([str(grid), "--out", str(out), "--report"])
    printed = capsys.readouterr().out
    assert "measured again, alone on the machine" in printed
    assert "beyond the protocol's noise (25.0%)" in printed
    assert "the latency guard applied to the final models" in printed and "re-projected: " in printed

    # A table measured anew (another cache) predicts other milliseconds: measuring now checks nothing.
    save_table(dataclasses.replace(table, residual_slope_ms=0.04), table_path(table.meta, cache))
    written.unlink()
    with pytest.raises(SystemExit) as stop:
        grid_script.main([str(grid), "--out", str(out), "--remeasure", "--no-progress"])
    assert stop.value.code == 2 and "the table was measured anew" in capsys.readouterr().err
    assert not written.exists()


def test_final_models_are_measured_again_only_on_the_machine_that_ran_them(grid_script: ModuleType) -> None:
    here = this_invocation()
    grid_script._check_same_machine([here, here], here, "s")
    other = {**here, "hardware": {**here["hardware"], "cpu_model": "Other CPU"}, "directory": "d"}
    with pytest.raises(
        InvalidSettingError, match=r"measured on Other CPU with torch .* Remeasure on the machine"
    ):
        grid_script._check_same_machine([here, other], here, "s")


def test_a_final_model_is_held_to_the_protocol_noise_when_its_row_carries_it() -> None:
    def row(measured: float, noise: float) -> dict[str, Any]:
        return {"metric": "latency", "model": "m", "dataset": "d", "target": 0.5, "latency_measured_ms": measured,
                "base_latency_measured_ms": 10.0, "latency_measured_iqr_ms": 0.01 * measured,
                "latency_prediction_error": 0.02, "latency_protocol_noise": noise}  # fmt: skip

    # 0.54 of the base: above 0.5 by 8%, beyond its own 1% spread, within a 10% protocol noise; 0.60 beyond both.
    (line,) = latency_lines([row(5.4, 0.10), row(6.0, 0.10), row(4.8, 0.10)])
    assert "2 of 3 final models above the target beyond their measurement's spread" in line
    assert "1 beyond the protocol's noise (10.0%)" in line
    (line,) = latency_lines([{**row(5.4, math.nan)}])
    assert "protocol's noise" not in line  # rows made before the noise was recorded: not claimed
