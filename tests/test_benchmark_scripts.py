"""The benchmark scripts' own logic that published results rest on: proxy_fidelity.py's merging of results,
budget_conditioned.py's and allocation_spread.py's resuming, latency_model.py's report head."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import load_script

from prune_env.app.measure import this_invocation


@pytest.fixture(scope="module")
def fidelity() -> ModuleType:
    return load_script("proxy_fidelity")


def _row(policy: int, accs: list[float], proxies: dict, ratios: list[float] | None = None, **extra) -> dict:
    return {
        "policy": policy,
        "ratios": ratios or [0.1 * policy, 0.2],
        "macs_fraction": 0.25,
        "finetuned_test_accuracy": sum(accs) / len(accs),
        "finetuned_test_accuracy_per_seed": accs,
        "finetuned_val_accuracy": sum(accs) / len(accs),
        "finetuned_test_loss": 1.0 - sum(accs) / len(accs),
        "finetune_seconds": 1.0,
        "proxies": proxies,
        **extra,
    }


def _write(path: Path, truth_seeds: int, rows: list[dict]) -> str:
    path.write_text(json.dumps({"args": {"truth_seeds": truth_seeds, "skip": 0}, "rows": rows}))
    return str(path)


def test_runs_merge_variants_and_fine_tune_seeds(fidelity: ModuleType, tmp_path: Path) -> None:
    proxy = {"accuracy": 0.5, "loss": 1.0, "eval_seconds": 1.0}
    first = _write(
        tmp_path / "a.json", 2, [_row(0, [0.8, 0.9], {"bn8": proxy}), _row(1, [0.6, 0.7], {"bn8": proxy})]
    )
    variants = _write(tmp_path / "b.json", 2, [_row(0, [0.8, 0.9], {"kd50": proxy})])
    seed = _write(tmp_path / "c.json", 1, [_row(0, [0.4], {}, truth_seeds=[2])])

    _, rows = fidelity.load_rows([first, variants, seed])
    assert set(rows[0]["proxies"]) == {"bn8", "kd50"} and set(rows[1]["proxies"]) == {"bn8"}
    assert rows[0]["truth_seeds"] == [0, 1, 2]
    assert rows[0]["finetuned_test_accuracy_per_seed"] == [0.8, 0.9, 0.4]
    assert rows[0]["finetuned_test_accuracy"] == pytest.approx(0.7)  # the mean over all three seeds
    assert rows[0]["finetuned_test_loss"] == pytest.approx(0.3)
    assert rows[1]["finetuned_test_accuracy"] == pytest.approx(0.65)  # untouched by the other files

    # The same fine-tune seeds again add nothing; other policies under the same number are refused.
    _, again = fidelity.load_rows([first, first])
    assert again[0]["finetuned_test_accuracy_per_seed"] == [0.8, 0.9]
    other = _write(tmp_path / "d.json", 2, [_row(0, [0.8, 0.9], {}, ratios=[0.5, 0.5])])
    with pytest.raises(ValueError, match="not the same run"):
        fidelity.load_rows([first, other])


def test_variant_names_parse_into_evaluator_settings(fidelity: ModuleType) -> None:
    parsed = fidelity.parse_variants("plain,bn8+kd50+re+lr0.02+b128+n3000", 1000)
    assert parsed["plain"] == {
        "bn_recalib_batches": 0,
        "finetune_steps": 0,
        "recalibrate_after_finetune": False,
        "eval_samples": 1000,
    }
    assert parsed["bn8+kd50+re+lr0.02+b128+n3000"] == {
        "bn_recalib_batches": 8,
        "finetune_steps": 50,
        "recalibrate_after_finetune": True,
        "eval_samples": 3000,
        "finetune_lr": 0.02,
        "finetune_batch_size": 128,
    }
    with pytest.raises(ValueError, match="bad variant"):
        fidelity.parse_variants("bn8+xyz", 1000)
    # A trained proxy's "+nostages" is not "+n<samples>": it trains without stages.
    trained = fidelity.parse_variants("supernet+nostages+kd3+n2000", 1000)["supernet+nostages+kd3+n2000"]
    assert trained["config"] == {"stages": ()}
    assert (trained["finetune_steps"], trained["eval_samples"]) == (3, 2000)


def test_truth_seed_start_offsets_the_fine_tune_seeds(
    fidelity: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--truth-seed-start adds fine-tunes with new seeds (a run that silently reused seed 0 happened)."""
    seen: list[int] = []

    def fake_finetune(
        pruned: object, teacher: object, splits: object, *, epochs: int, seed: int, progress: bool
    ) -> tuple[None, dict[str, float]]:
        seen.append(seed)
        return None, {"test_accuracy": seed / 10, "val_accuracy": 0.0, "test_loss": 0.0}

    monkeypatch.setattr(fidelity, "finetune", fake_finetune)
    args = argparse.Namespace(seed=5, truth_seed_start=2, truth_seeds=2, finetune_epochs=1)
    row = fidelity.fine_tuned_truth(args, None, None, None)
    assert seen == [7, 8]
    assert row["truth_seeds"] == [2, 3] and row["finetuned_test_accuracy_per_seed"] == [0.7, 0.8]


def test_budget_conditioned_policy_serves_every_target_and_resumes(tmp_path: Path, cached: Path) -> None:
    script = load_script("budget_conditioned")
    out = tmp_path / "conditioned"
    argv = [
        "--dataset", "digits", "--targets", "0.7", "0.4", "--evals", "6", "--range-evals", "6",
        "--proxy", "recalibration", "--finetune-epochs", "1", "--finetune-samples", "300", "--out", str(out),
    ]  # fmt: skip
    script.main(argv)
    rows = json.loads((out / "rows.json").read_text())
    assert sorted((r["method"], r["target"]) for r in rows) == [
        (m, t) for m in ("ppo over range", "ppo per target", "uniform") for t in (0.4, 0.7)
    ]
    for r in rows:
        assert r["macs_ratio"] <= r["target"] + 1e-9
        assert r["evals"] == (6 if r["method"] == "ppo per target" else 0)
    conditioned = {r["target"]: r["keep"] for r in rows if r["method"] == "ppo over range"}
    assert conditioned[0.4] != conditioned[0.7]  # one policy, a different pruning per target

    # Resuming: a dropped row is redone from the saved policy, with the same pruning.
    (out / "rows.json").write_text(json.dumps([r for r in rows if r["method"] != "ppo over range"]))
    script.main(argv)
    again = json.loads((out / "rows.json").read_text())
    assert len(again) == len(rows)
    assert {r["target"]: r["keep"] for r in again if r["method"] == "ppo over range"} == conditioned
    # The settings file names the code that made the rows; a run resumed in this process once.
    assert json.loads((out / "settings.json").read_text())["provenance"] == [this_invocation()]
    with pytest.raises(SystemExit, match="other settings"):
        script.main([*argv, "--seeds", "1"])


def test_learned_vs_uniform_reports_several_directories_and_refuses_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("learned_vs_uniform")
    fields = ["agent", "model", "dataset", "target", "seed", "metric", "reward", "budget_evals", "evals_used",
              "best_reward", "best_accuracy", "macs_ratio", "params_ratio", "test_accuracy", "seconds"]  # fmt: skip
    for name, agent, accs in (("a", "uniform", (0.80, 0.81)), ("b", "random", (0.85, 0.84))):
        (tmp_path / name).mkdir()
        lines = [",".join(fields)] + [
            f"{agent},m,d,0.1,{seed},params,acc,10,10,0.5,0.5,0.2,0.1,{acc},1.0"
            for seed, acc in enumerate(accs)
        ]
        (tmp_path / name / "runs.csv").write_text("\n".join(lines) + "\n")
    script.main(["--report", str(tmp_path / "a"), str(tmp_path / "b")])
    table = capsys.readouterr().out
    assert "random" in table and "uniform" in table and "+0.0400 [" in table  # both directories, paired
    assert (tmp_path / "a" / "pareto.png").exists() and not (tmp_path / "b" / "pareto.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--report", str(tmp_path / "a"), str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "no runs.csv in" in capsys.readouterr().err


def test_budget_conditioned_params_targets_bound_parameters(tmp_path: Path, cached: Path) -> None:
    script = load_script("budget_conditioned")
    out = tmp_path / "conditioned"
    argv = [
        "--dataset", "digits", "--targets", "0.6", "0.3", "--metric", "params", "--evals", "4",
        "--range-evals", "4", "--proxy", "recalibration", "--finetune-epochs", "1", "--finetune-samples", "300",
        "--out", str(out),
    ]  # fmt: skip
    script.main(argv)
    rows = json.loads((out / "rows.json").read_text())
    assert len(rows) == 6
    for r in rows:
        assert r["target"] - 0.1 <= r["params_ratio"] <= r["target"] + 1e-9, r
    # The budget is on parameters, not MACs: a search may spend more MACs than a MACs budget would allow.
    assert any(r["macs_ratio"] > r["target"] + 0.02 for r in rows)
    # A run saved before the metric was an option resumes as the MACs run it was, not as a params one.
    settings = json.loads((out / "settings.json").read_text())
    assert settings["metric"] == "params"
    del settings["metric"]
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match="other settings"):
        script.main(argv)


def test_allocation_spread_resumes_an_interrupted_setting_without_repeating_fine_tunes(
    tmp_path: Path, cached: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script("allocation_spread")
    calls: list[tuple[int, tuple[int, ...]]] = []
    stop_after = [4]

    def fake_tuned(problem, keep, epochs, samples, seed):  # type: ignore[no-untyped-def]
        if len(calls) == stop_after[0]:
            raise KeyboardInterrupt  # the process stops part-way through the setting
        calls.append((epochs, tuple(int(k) for k in keep)))
        score = 0.5 + 0.01 * len(calls)
        return {"epochs": epochs, "val_accuracy": score, "test_accuracy": score, "seconds": 0.0}

    monkeypatch.setattr(script, "tuned", fake_tuned)
    out = tmp_path / "spread.json"
    argv = ["--dataset", "digits", "--models", "resnet20", "--budgets", "0.5", "--random", "3",
            "--lengths", "1", "2", "--out", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        script.main(argv)
    partial = json.loads(out.read_text())
    assert partial["rows"] == [] and len(partial["unfinished"]["screen"]) == 3
    assert set(partial["unfinished"]["lengths"]["uniform"]) == {"1"}
    stop_after[0] = -1
    script.main(argv)
    saved = json.loads(out.read_text())
    assert "unfinished" not in saved and len(saved["rows"]) == 1
    # 3 screens + uniform at 1 epoch (best random at 1 epoch is its screen) + both at 2 epochs: the
    # second run did only the two that were missing.
    assert [c[0] for c in calls] == [1, 1, 1, 1, 2, 2]
    assert set(saved["rows"][0]["lengths"]["uniform"]) == {"1", "2"}
    assert saved["rows"][0]["screen"] == partial["unfinished"]["screen"]
    assert partial["provenance"] == saved["provenance"] == [this_invocation()]


def test_allocation_spread_params_budget_is_its_own_setting(
    tmp_path: Path, cached: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script("allocation_spread")

    def fake_tuned(problem, keep, epochs, samples, seed):  # type: ignore[no-untyped-def]
        return {"epochs": epochs, "val_accuracy": 0.5, "test_accuracy": 0.5, "seconds": 0.0}

    monkeypatch.setattr(script, "tuned", fake_tuned)
    out = tmp_path / "spread.json"
    argv = ["--dataset", "digits", "--models", "resnet20", "--budgets", "0.3", "--random", "3",
            "--lengths", "1", "--out", str(out)]  # fmt: skip
    script.main(argv)
    script.main([*argv, "--metric", "params"])  # same model and budget, other metric: not skipped
    macs_row, params_row = json.loads(out.read_text())["rows"]
    assert (macs_row["metric"], params_row["metric"]) == ("macs", "params")
    for row, metric in ((macs_row, "macs_fraction"), (params_row, "params_fraction")):
        fractions = [row[metric]["uniform"], *row[metric]["random"]]
        assert all(0.25 <= f <= 0.3 for f in fractions), fractions
    # Spending the same budget on parameters lets random policies keep early layers: MACs differ.
    assert params_row["random_keep"] != macs_row["random_keep"]


def test_latency_model_report_names_the_code_of_old_and_new_results_files() -> None:
    made_by = load_script("latency_model").made_by
    machine = {"hardware": {"cpu_model": "cpu", "cpu_count": 2}, "versions": {"torch": "2.0"}}
    settings = {"settings": {"policies": 3}, "entries": []}
    # Written before the shared results writer: one record at the top level, its command one string.
    old = {**settings, **machine, "revision": "a" * 40, "command": "python benchmarks/latency_model.py"}
    assert made_by(old) == [
        f"revision {'a' * 40}; cpu, 2 cores; torch 2.0; settings policies 3",
        "command: python benchmarks/latency_model.py",
    ]
    # Resumed by two invocations of other code: both revisions and both commands are named.
    records = [
        {**machine, "revision": rev, "command": ["benchmarks/latency_model.py", "--policies", "3"]}
        for rev in ("b" * 40, "c" * 40)
    ]
    lines = made_by({**settings, "provenance": records})
    assert lines[0].startswith(f"revision {'b' * 40}, {'c' * 40}; cpu, 2 cores")
    assert lines[1:] == ["command: python benchmarks/latency_model.py --policies 3"] * 2


def test_latency_model_reports_a_new_results_file_with_its_own_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latency.json"
    argv = ["--models", "resnet20", "--batches", "1", "--policies", "2", "--repeats", "3", "--out", str(out)]
    load_script("latency_model").main(argv)
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert [e["model"] for e in written["entries"]] == ["resnet20"]
    assert printed.startswith(f"revision {written['provenance'][0]['revision']}; ")
    assert "resnet20" in printed and "goal:" in printed
