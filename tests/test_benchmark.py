"""The benchmark harness: tidy files, resume, the table and the plots, on a tiny grid."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure

from prune_env.app import benchmark
from prune_env.app.results import BenchmarkResults, incumbent_accuracy, pareto_front
from prune_env.app.tidy_files import EVAL_FIELDS, RUN_FIELDS, append_csv
from prune_env.errors import ResumeError

AGENTS = ("uniform", "random")
SEEDS = (0, 1)
EVALS = 3
# The smallest proxy that still separates policies: keeps every evaluation a few tens of milliseconds.
PROBLEM = {"eval_samples": 96, "bn_recalib_batches": 1}


def _grid(out: Path, **overrides: Any) -> BenchmarkResults:
    kwargs: dict[str, Any] = {
        "agents": AGENTS,
        "seeds": SEEDS,
        "evals": EVALS,
        "out": out,
        "problem_kwargs": PROBLEM,
        "progress": False,
    }
    return benchmark.run(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def grid(
    digits_base: Any, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BenchmarkResults, Path]]:
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNE_ENV_CACHE", str(shared_cache))
        yield _grid(out), out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_files_are_tidy(grid: tuple[BenchmarkResults, Path]) -> None:
    results, out = grid
    runs, evals = _csv(out / "runs.csv"), _csv(out / "evaluations.csv")
    assert len(runs) == len(AGENTS) * len(SEEDS)
    assert list(runs[0]) == list(RUN_FIELDS)
    assert list(evals[0]) == list(EVAL_FIELDS)
    assert len(evals) == sum(int(r["evals_used"]) for r in runs)
    assert {(r["agent"], int(r["seed"])) for r in runs} == {(a, s) for a in AGENTS for s in SEEDS}
    by_agent = {r["agent"]: int(r["evals_used"]) for r in runs}
    assert by_agent == {"uniform": 1, "random": EVALS}  # uniform is deterministic: one evaluation
    for r in runs:
        assert float(r["macs_ratio"]) <= float(r["target"]) + 1e-9
        assert r["test_accuracy"] == ""  # no fine-tune asked: blank, not a made-up number
    saved = json.loads((out / "runs.json").read_text())
    assert len(saved["runs"]) == len(runs)
    assert saved["settings"]["evals"] == EVALS
    # What the results object holds is what the files hold.
    assert len(results.runs) == len(runs)
    assert len(results.evaluations) == len(evals)
    loaded = BenchmarkResults.load(out)
    assert [r["best_accuracy"] for r in loaded.runs] == pytest.approx(
        [r["best_accuracy"] for r in results.runs]
    )


def test_best_is_the_best_evaluation(grid: tuple[BenchmarkResults, Path]) -> None:
    results, _ = grid
    for r in results.runs:
        rewards = [
            e["reward"] for e in results.evaluations if (e["agent"], e["seed"]) == (r["agent"], r["seed"])
        ]
        assert r["best_reward"] == pytest.approx(max(rewards))


def test_seeds_reproduce(grid: tuple[BenchmarkResults, Path], tmp_path: Path, cached: Path) -> None:
    results, _ = grid
    again = _grid(tmp_path, agents=("random",), seeds=(1,))
    first = next(r for r in results.runs if (r["agent"], r["seed"]) == ("random", 1))
    assert again.runs[0]["keep"] == first["keep"]
    assert again.runs[0]["best_accuracy"] == pytest.approx(first["best_accuracy"])


def test_resume_skips_completed_runs(
    grid: tuple[BenchmarkResults, Path], monkeypatch: pytest.MonkeyPatch, cached: Path
) -> None:
    results, out = grid
    before = (out / "runs.csv").read_text(), (out / "evaluations.csv").read_text()

    def no_runs(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a completed run was run again")

    monkeypatch.setattr(benchmark, "_one_run", no_runs)
    monkeypatch.setattr(benchmark.GridSpec, "problem", no_runs)  # nothing to do: not even a problem is built
    again = _grid(out)
    assert ((out / "runs.csv").read_text(), (out / "evaluations.csv").read_text()) == before
    assert len(again.runs) == len(results.runs)
    assert len(again.evaluations) == len(results.evaluations)


def test_interrupted_grid_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: Path) -> None:
    real = benchmark._one_run
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a user stopping the notebook mid-grid
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "_one_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        _grid(tmp_path)
    assert len(_csv(tmp_path / "runs.csv")) == 2
    # Rows of a run killed between its evaluations and its run row must not survive into the results.
    with (tmp_path / "evaluations.csv").open("a", newline="") as f:
        csv.writer(f).writerow(
            ["random", "resnet20", "digits", 0.5, 1, 0, 0.1, 0.1, 1.0, 0.3, 0.3, 0.0, "", ""]
        )
    calls.clear()
    results = _grid(tmp_path)
    assert len(calls) == len(AGENTS) * len(SEEDS) - 2  # only the missing runs
    runs, evals = _csv(tmp_path / "runs.csv"), _csv(tmp_path / "evaluations.csv")
    assert len(runs) == len(results.runs) == len(AGENTS) * len(SEEDS)
    assert len(evals) == len(results.evaluations) == sum(int(r["evals_used"]) for r in runs)


def test_a_grid_written_with_fewer_columns_gains_them_and_keeps_its_rows(
    grid: tuple[BenchmarkResults, Path], tmp_path: Path, cached: Path
) -> None:
    """An earlier version wrote runs.csv without the columns added since: a resumed grid widens its header
    (the old rows blank there, every cell kept) before appending, never writing rows under the wrong names.
    A file with columns this version does not know is refused."""
    results, out = grid
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    runs_csv = copy / "runs.csv"
    old_fields = RUN_FIELDS[: RUN_FIELDS.index("revision") + 1]
    old_rows = [{k: r[k] for k in old_fields} for r in _csv(runs_csv)]
    with runs_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old_fields))
        writer.writeheader()
        writer.writerows(old_rows[:-1])  # the last run is run again
    again = _grid(copy)
    rows = _csv(runs_csv)
    assert list(rows[0]) == list(RUN_FIELDS) and len(rows) == len(results.runs) == len(again.runs)
    assert [{k: r[k] for k in old_fields} for r in rows[:-1]] == old_rows[:-1]
    assert rows[0]["searched_keep"] == "" and rows[-1]["keep"] == old_rows[-1]["keep"]
    with runs_csv.open("w", newline="") as f:
        csv.writer(f).writerows([[*old_fields, "someone_elses_column"], *([""] * (len(old_fields) + 1),)])
    with pytest.raises(ResumeError, match="someone_elses_column"):
        append_csv(runs_csv, RUN_FIELDS, [])


def test_settings_mismatch_is_refused(grid: tuple[BenchmarkResults, Path], cached: Path) -> None:
    _, out = grid
    with pytest.raises(ValueError, match="another `out`"):
        _grid(out, evals=EVALS + 1)


@pytest.mark.parametrize("unrecorded", ["problem_kwargs", "finetune_samples", "runs.json"])
def test_runs_whose_settings_were_not_recorded_are_not_resumed(
    grid: tuple[BenchmarkResults, Path], tmp_path: Path, unrecorded: str
) -> None:
    """A directory cannot show its runs were made with this grid's proxy and fine-tune data unless it
    recorded them: a resume is refused, never assumed comparable."""
    _, out = grid
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    saved = copy / "runs.json"
    if unrecorded == "runs.json":
        saved.unlink()
    else:
        document = json.loads(saved.read_text())
        del document["settings"][unrecorded]
        saved.write_text(json.dumps(document))
    with pytest.raises(
        ValueError, match=f"{'problem_kwargs' if unrecorded == 'runs.json' else unrecorded} is not recorded"
    ):
        _grid(copy)


def test_finetune_on_a_fixed_training_subset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: Path
) -> None:
    """Every run fine-tunes on the same seeded subset of the training split, and a grid asking for
    another subset is refused in the same directory."""
    import prune_env.train

    seen: list[list[int]] = []

    def fake_finetune(model: Any, teacher: Any, splits: Any, epochs: int, **kwargs: Any) -> Any:
        seen.append(list(splits.train.indices))
        return model, {"val_accuracy": 0.5, "test_accuracy": 0.5}

    monkeypatch.setattr(prune_env.train, "finetune", fake_finetune)
    results = _grid(tmp_path, agents=["uniform", "random"], finetune_epochs=1, finetune_samples=40)
    assert len(seen) == len(results.runs) == 2 * len(SEEDS)
    assert len(seen[0]) == 40 and all(indices == seen[0] for indices in seen)
    assert json.loads((tmp_path / "runs.json").read_text())["settings"]["finetune_samples"] == 40
    with pytest.raises(ValueError, match="finetune_samples=40"):
        _grid(tmp_path, agents=["uniform", "random"], finetune_epochs=1, finetune_samples=80)


def test_table(grid: tuple[BenchmarkResults, Path]) -> None:
    results, _ = grid
    table = results.table()
    for agent in AGENTS:
        assert agent in table
    assert "±" in table
    summary = {s["agent"]: s for s in results.summary()}
    assert summary["random"]["seeds"] == len(SEEDS)
    assert summary["uniform"]["best_accuracy_std"] == pytest.approx(0.0)  # deterministic


def test_plots(grid: tuple[BenchmarkResults, Path], tmp_path: Path) -> None:
    results, _ = grid
    pareto = results.plot_pareto(tmp_path / "pareto.png")
    assert isinstance(pareto, Figure)
    (ax,) = pareto.axes
    labels = [line.get_label() for line in ax.lines]
    assert "random" in labels  # its front
    assert "uniform" in labels  # the reference line
    assert sum(isinstance(c, PathCollection) for c in ax.collections) == 1  # random's evaluations
    assert (tmp_path / "pareto.png").stat().st_size > 0

    curves = results.plot_curves(tmp_path / "curves.png")
    assert isinstance(curves, Figure)
    (ax,) = curves.axes
    assert len(ax.lines) == len(AGENTS)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == len(AGENTS)  # seed bands
    assert len(ax.lines[1].get_xdata()) == EVALS
    assert (tmp_path / "curves.png").stat().st_size > 0

    # Results read back from the files plot the same curves (an evaluation's reward is a number there,
    # while a run's names the reward function).
    _, out = grid
    loaded = BenchmarkResults.load(out)
    assert all(isinstance(e["reward"], float) for e in loaded.evaluations)
    assert all(isinstance(r["reward"], str) for r in loaded.runs)
    (reloaded,) = loaded.plot_curves().axes
    for line, again in zip(ax.lines, reloaded.lines, strict=True):
        np.testing.assert_allclose(again.get_ydata(), line.get_ydata())


def test_paired_difference_to_uniform_has_a_t_interval() -> None:
    """Differences are paired by seed (a seed only one agent ran is left out), with a 95% Student-t
    interval; the table shows them beside the test accuracy."""

    def run(agent: str, seed: int, acc: float) -> dict[str, Any]:
        return {"agent": agent, "model": "m", "dataset": "d", "target": 0.3, "seed": seed,
                "evals_used": 5, "best_accuracy": 0.5, "macs_ratio": 0.3, "params_ratio": 0.4,
                "test_accuracy": acc, "seconds": 1.0}  # fmt: skip

    uniform = [0.80, 0.82, 0.81, 0.90]
    learned = [0.83, 0.84, 0.85]  # no seed 3: its pair is left out
    results = BenchmarkResults(
        [run("uniform", k, a) for k, a in enumerate(uniform)]
        + [run("ppo", k, a) for k, a in enumerate(learned)]
    )
    (row,) = results.paired()
    diff = np.array(learned) - np.array(uniform[:3])
    half = 4.302652729911275 * diff.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert row["agent"] == "ppo" and row["pairs"] == 3
    assert row["mean_difference"] == pytest.approx(diff.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert f"{diff.mean():+.4f} [{diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]" in results.table()
    single = BenchmarkResults([run("uniform", 0, 0.8), run("ppo", 0, 0.9)])
    (one,) = single.paired()
    assert one["mean_difference"] == pytest.approx(0.1) and np.isnan(one["ci_low"])


def test_grids_run_apart_combine_into_one_table(grid: tuple[BenchmarkResults, Path], tmp_path: Path) -> None:
    """Two directories of one grid report as one: a run both hold is counted once, evaluations follow
    their runs, and grids with other settings are refused instead of compared as equals."""
    results, out = grid
    loaded = BenchmarkResults.load(out)
    assert loaded.settings["evals"] == EVALS and loaded.settings["problem_kwargs"] == PROBLEM
    assert loaded.settings == results.settings  # what the grid ran with, as it returned it
    uniform_only = BenchmarkResults(
        [r for r in loaded.runs if r["agent"] == "uniform"],
        [e for e in loaded.evaluations if e["agent"] == "uniform"],
        tmp_path,
        dict(loaded.settings),
    )
    changed = {**uniform_only.runs[0], "test_accuracy": 0.123}
    second = BenchmarkResults([changed], [], tmp_path, dict(loaded.settings))
    combined = BenchmarkResults.combine([loaded, uniform_only, second])
    assert len(combined.runs) == len(loaded.runs)  # nothing counted twice
    assert combined.runs == loaded.runs  # the first directory's copy of a run is kept
    assert len(combined.evaluations) == len(loaded.evaluations)
    assert combined.out == out
    other = BenchmarkResults(uniform_only.runs, [], tmp_path, {**loaded.settings, "evals": EVALS + 1})
    with pytest.raises(ValueError, match=f"evals={EVALS + 1}.*not comparable"):
        BenchmarkResults.combine([loaded, other])
    with pytest.raises(ValueError, match="at least one"):
        BenchmarkResults.combine([])


def test_table_compares_against_several_references() -> None:
    def run(agent: str, seed: int, acc: float) -> dict[str, Any]:
        return {"agent": agent, "model": "m", "dataset": "d", "target": 0.3, "seed": seed,
                "evals_used": 5, "best_accuracy": 0.5, "macs_ratio": 0.3, "params_ratio": 0.4,
                "test_accuracy": acc, "seconds": 1.0}  # fmt: skip

    accs = {"uniform": (0.80, 0.81), "random": (0.85, 0.84), "ppo": (0.86, 0.87)}
    results = BenchmarkResults([run(agent, k, a) for agent, pair in accs.items() for k, a in enumerate(pair)])
    header, _, *lines = results.table(references=("uniform", "random")).splitlines()[1:]
    assert "vs uniform [95% CI]" in header and "vs random [95% CI]" in header
    ppo = next(line for line in lines if "ppo" in line)
    assert "+0.0600 [" in ppo and "+0.0200 [" in ppo  # 0.86/0.87 against 0.80/0.81, then 0.85/0.84
    assert "vs random" not in results.table()  # uniform alone by default
    assert "vs random" not in BenchmarkResults([run("uniform", 0, 0.8)]).table(references=("random",))


def test_pareto_front() -> None:
    cost = np.array([0.5, 0.2, 0.3, 0.3, 0.4])
    acc = np.array([0.9, 0.5, 0.4, 0.7, 0.6])
    np.testing.assert_allclose(pareto_front(cost, acc), [[0.2, 0.5], [0.3, 0.7], [0.5, 0.9]])


def test_incumbent_accuracy_follows_reward() -> None:
    history = [
        {"reward": 0.1, "accuracy": 0.9},
        {"reward": 0.3, "accuracy": 0.5},  # better reward, lower accuracy: the search's answer changes
        {"reward": 0.2, "accuracy": 0.99},
    ]
    np.testing.assert_allclose(incumbent_accuracy(history), [0.9, 0.5, 0.5])


def test_custom_agent_and_reward_are_labelled(tmp_path: Path, cached: Path) -> None:
    def halves(evaluator: Any, rng: np.random.Generator) -> None:
        evaluator.evaluate(np.full(evaluator.n_groups, 0.5))

    def fewer_params(outcome: Any) -> float:
        return outcome.accuracy - 2.0 * outcome.params_ratio

    results = _grid(tmp_path, agents={"halves": halves}, seeds=(0,), reward=fewer_params)
    (row,) = results.runs
    assert (row["agent"], row["reward"], row["evals_used"]) == ("halves", "fewer_params", 1)
    assert row["best_reward"] == pytest.approx(row["best_accuracy"] - 2.0 * row["params_ratio"])
    assert "halves" in results.table()


def test_other_proxy_settings_are_refused(grid: tuple[BenchmarkResults, Path], cached: Path) -> None:
    _, out = grid
    with pytest.raises(ValueError, match="problem_kwargs"):
        _grid(out, problem_kwargs={**PROBLEM, "eval_samples": 128})


def test_params_budget_runs_are_plotted_against_parameters(tmp_path: Path, cached: Path) -> None:
    results = _grid(tmp_path, agents=("uniform", "random"), seeds=(0,), metric="params", targets=(0.4,))
    (ax,) = results.plot_pareto().axes
    assert ax.get_xlabel() == "parameters / base parameters"
    (points,) = ax.collections  # random's evaluations
    xs = points.get_offsets()[:, 0]
    assert np.allclose(
        sorted(xs), sorted(e["params_ratio"] for e in results.evaluations if e["agent"] == "random")
    )
    assert all(x <= 0.4 for x in xs)  # the budget, in the axis' own unit
