"""The benchmark's reviewer-grade report: paired differences with Student-t intervals on validation and test,
the best non-learned baseline chosen by validation, Holm-adjusted claims and the project's goals.

Every expected number is computed by hand from the synthetic runs (t quantiles and the closed-form t
distribution of 2 and 4 degrees of freedom), not by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from benchmark_scripts import load_script

from prune_env.app.paired import BEST, Claim, check_claims, goals, holm
from prune_env.app.results import BenchmarkResults, load_paired
from prune_env.errors import InvalidSettingError

T975 = {2: 4.302652729749462, 4: 2.7764451051977934}  # Student-t 97.5% quantiles (tables)


def _p_two_sided(t: float, df: int) -> float:
    """Closed forms of the two-sided t-test p-value: for even df, P(|T| < t) = sinθ (1 + cos²θ / 2 + ...)
    with tanθ = t / √df."""
    sin = abs(t) / math.sqrt(t * t + df)
    cos2 = df / (t * t + df)
    return {2: 1 - sin, 4: 1 - sin * (1 + cos2 / 2)}[df]


def _hand(diffs: list[float]) -> tuple[float, float, float, float]:
    """(mean, low, high, p) of paired differences, by the textbook formulas."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = T975[n - 1] * se
    return mean, mean - half, mean + half, _p_two_sided(mean / se, n - 1)


def _runs(
    accuracies: dict[str, tuple[list[float], list[float]]], target: float = 0.5
) -> list[dict[str, Any]]:
    """One run per agent and seed: ``{agent: (val accuracies, test accuracies)}`` by seed."""
    return [
        {"agent": agent, "model": "m", "dataset": "d", "metric": "macs", "target": target, "seed": seed,
         "evals_used": 4, "best_accuracy": 0.5, "macs_ratio": target, "params_ratio": 0.4,
         "val_accuracy": val[seed], "test_accuracy": test[seed], "seconds": 1.0}
        for agent, (val, test) in accuracies.items()
        for seed in range(len(val))
    ]  # fmt: skip


def _cell(mean: float, low: float, high: float) -> str:
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def _line(table: str, agent: str, split: str) -> str:
    return next(line for line in table.splitlines() if f" {agent} " in line and f" {split} " in line)


# Three seeds: uniform, then ppo whose differences to it are val [0.03, 0.04, 0.02] and test [0.02, 0.04, 0.03].
THREE = {"uniform": ([0.80, 0.81, 0.82], [0.79, 0.80, 0.81]), "ppo": ([0.83, 0.85, 0.84], [0.81, 0.84, 0.84])}
# Five seeds: differences of ppo to uniform val [0.01, 0.02, 0.03, 0.02, 0.02], test [0.02, 0.03, 0.02, 0.03, 0.02];
# random sits between them.
FIVE = {
    "uniform": ([0.80, 0.80, 0.80, 0.80, 0.80], [0.79, 0.79, 0.79, 0.79, 0.79]),
    "random": ([0.805, 0.81, 0.80, 0.81, 0.805], [0.80, 0.80, 0.79, 0.80, 0.795]),
    "ppo": ([0.81, 0.82, 0.83, 0.82, 0.82], [0.81, 0.82, 0.81, 0.82, 0.81]),
}


@pytest.mark.parametrize(
    ("accuracies", "val_diffs", "test_diffs"),
    [
        (THREE, [0.03, 0.04, 0.02], [0.02, 0.04, 0.03]),
        (FIVE, [0.01, 0.02, 0.03, 0.02, 0.02], [0.02, 0.03, 0.02, 0.03, 0.02]),
    ],
    ids=["n=3", "n=5"],
)
def test_paired_differences_match_a_hand_computation(
    accuracies: dict[str, tuple[list[float], list[float]]], val_diffs: list[float], test_diffs: list[float]
) -> None:
    results = BenchmarkResults(_runs(accuracies))
    rows = {(r["agent"], r["reference"], r["split"]): r for r in results.comparisons(("uniform",))}
    table = results.table()
    for split, diffs in (("val", val_diffs), ("test", test_diffs)):
        mean, low, high, p = _hand(diffs)
        row = rows[("ppo", "uniform", split)]
        assert row["pairs"] == len(diffs)
        assert (row["mean_difference"], row["ci_low"], row["ci_high"]) == pytest.approx((mean, low, high))
        assert row["p"] == pytest.approx(p, rel=1e-9)
        assert _cell(mean, low, high) in _line(table, "ppo", split)  # on that split's line of the table


def test_the_table_shows_mean_and_sample_std_of_both_splits() -> None:
    table = BenchmarkResults(_runs(THREE)).table()
    # ppo's val [0.83, 0.85, 0.84]: mean 0.84, sample std 0.01 (ddof=1; the population std is 0.0082).
    assert "0.8400 ± 0.0100" in _line(table, "ppo", "val")
    # ppo's test [0.81, 0.84, 0.84]: mean 0.83, sample std √(0.0006 / 2) = 0.0173.
    assert "0.8300 ± 0.0173" in _line(table, "ppo", "test")


def test_only_seeds_both_agents_ran_are_paired() -> None:
    runs = _runs(THREE)
    runs = [r for r in runs if not (r["agent"] == "uniform" and r["seed"] == 2)]  # uniform lacks seed 2
    (row,) = [
        r
        for r in BenchmarkResults(runs).comparisons(("uniform",))
        if (r["split"], r["agent"], r["role"]) == ("val", "ppo", "uniform")
    ]
    assert row["pairs"] == 2
    assert row["mean_difference"] == pytest.approx((0.03 + 0.04) / 2)


def test_the_best_non_learned_baseline_is_chosen_by_validation_not_test() -> None:
    # knapsack has the better validation mean, global the better test mean: knapsack is the baseline.
    accuracies = {
        "uniform": ([0.80, 0.80, 0.80], [0.80, 0.80, 0.80]),
        "knapsack": ([0.83, 0.83, 0.83], [0.81, 0.81, 0.81]),
        "global": ([0.82, 0.82, 0.82], [0.84, 0.84, 0.84]),
        "random": ([0.85, 0.85, 0.85], [0.85, 0.85, 0.85]),  # a search, not a baseline: never the best
        "ppo": ([0.84, 0.85, 0.86], [0.84, 0.85, 0.86]),
    }
    results = BenchmarkResults(_runs(accuracies))
    best = [r for r in results.comparisons() if r["role"] == BEST]
    assert {r["reference"] for r in best} == {"knapsack"}
    ppo_test = next(r for r in best if r["agent"] == "ppo" and r["split"] == "test")
    assert ppo_test["mean_difference"] == pytest.approx(0.85 - 0.81)  # against knapsack's test, 0.81
    table = results.table(references=("uniform", "random"))
    assert "vs best baseline [95% CI]" in table
    assert "(highest mean validation accuracy): knapsack" in table
    assert "(best baseline)" in _line(table, "knapsack", "test")
    assert "(best baseline)" not in _line(table, "global", "test")


def test_holm_adjustment_matches_a_hand_example() -> None:
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → kept non-decreasing: 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.3, math.nan, 0.6])  # an untestable comparison is not counted
    assert adjusted[0] == pytest.approx(0.6) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    with pytest.raises(InvalidSettingError, match="p-values"):
        holm([1.5])


def test_a_claim_significant_alone_fails_after_holm() -> None:
    """Validation and test each give p = 0.035 < 0.05 alone; the table's family of two makes both 0.070."""
    results = BenchmarkResults(_runs(THREE))
    rows = results.comparisons(("uniform",))
    p = _hand([0.03, 0.04, 0.02])[3]  # both splits have these differences, in another order
    assert p < 0.05
    (verdict,) = check_claims(rows)  # by default: every learned agent against the best baseline
    assert (verdict["agent"], verdict["reference"]) == ("ppo", "uniform")  # uniform is the only baseline
    assert not verdict["survives"]
    for split in ("val", "test"):
        assert verdict["splits"][split]["p"] == pytest.approx(p)
        assert verdict["splits"][split]["p_holm"] == pytest.approx(2 * p)
        assert verdict["splits"][split]["family"] == 2
    assert "Holm p 0.0702" in verdict["reason"]
    (on_test,) = check_claims(rows, [Claim("ppo", "uniform", ("test",))])
    assert not on_test["survives"]  # the family is the table's, whatever the claim checks
    assert check_claims(rows, alpha=0.08)[0]["survives"]
    with pytest.raises(InvalidSettingError, match="does not compare 'ppo' with 'evolution'"):
        check_claims(rows, [Claim("ppo", "evolution")])
    with pytest.raises(InvalidSettingError, match="splits"):
        Claim("ppo", splits=("train",))


def test_headline_and_goals_on_five_seeds() -> None:
    results = BenchmarkResults(_runs(FIVE))
    text = results.verdicts()
    headline = next(line for line in text.splitlines() if line.startswith("headline"))
    assert "ppo − uniform (best non-learned baseline)" in headline and "SURVIVES" in headline
    rows = results.comparisons()
    met = {g["goal"].split(" by")[0]: g for g in goals(rows)}
    learned, rl = met["learned beats the best non-learned baseline"], met["RL beats random"]
    assert learned["met"] and learned["agent"] == "ppo" and learned["reference"] == "uniform"
    # ppo − random on test: [0.01, 0.02, 0.02, 0.02, 0.015], mean 0.017 ≥ 0.005, both intervals above 0.
    assert rl["met"] and rl["test"]["mean_difference"] == pytest.approx(0.017)
    strict = {g["goal"].split(" by")[0]: g for g in goals(rows, learned_margin=0.03, rl_margin=0.02)}
    assert not strict["learned beats the best non-learned baseline"]["met"]
    assert "test +2.40 pt < 3 pt" in strict["learned beats the best non-learned baseline"]["reason"]
    assert not strict["RL beats random"]["met"]
    assert "goal [m/d macs target 0.5]" in text and "MET" in text


def test_goals_need_five_seeds() -> None:
    (learned, rl) = goals(BenchmarkResults(_runs(THREE)).comparisons())
    assert not learned["met"] and "3 paired seeds < 5" in learned["reason"]
    assert not rl["met"] and rl["agent"] is None  # random did not run
    assert goals(BenchmarkResults(_runs(THREE)).comparisons(), min_seeds=3)[0]["met"]
    with pytest.raises(InvalidSettingError, match="min_seeds"):
        goals([], min_seeds=1)


def test_without_a_baseline_there_is_no_default_claim_nor_headline() -> None:
    results = BenchmarkResults(_runs({"random": THREE["uniform"], "ppo": THREE["ppo"]}))
    rows = results.comparisons()
    assert rows and not any(r["role"] == BEST for r in rows)
    assert check_claims(rows) == []
    assert results.verdicts().splitlines()[0].startswith("headline: no learned agent compared")
    assert "goals: nothing to check" in BenchmarkResults(_runs({"ppo": THREE["ppo"]})).verdicts()


def test_the_paired_table_is_written_and_reads_back(tmp_path: Path) -> None:
    results = BenchmarkResults(_runs(FIVE), out=tmp_path)
    path = results.write_paired()
    assert path == tmp_path / "paired.csv"
    loaded = load_paired(path)
    written = results.comparisons()
    assert len(loaded) == len(written)
    for a, b in zip(loaded, written, strict=True):
        assert {k: a[k] for k in ("agent", "reference", "role", "split", "pairs", "family")} == {
            k: b[k] for k in ("agent", "reference", "role", "split", "pairs", "family")
        }
        for key in ("mean_difference", "ci_low", "ci_high", "p", "p_holm"):
            assert a[key] == pytest.approx(b[key])


def _directory(path: Path, runs: list[dict[str, Any]], revision: str | None) -> Path:
    """A grid directory as the harness writes it (``revision=None``: as written before revisions)."""
    from prune_env.app.tidy_files import RUN_FIELDS, write_csv

    path.mkdir()
    fields = [f for f in RUN_FIELDS if revision is not None or f != "revision"]
    write_csv(path / "runs.csv", fields, [{**r, "revision": revision} for r in runs])
    return path


def test_learned_vs_uniform_reports_verdicts_and_refuses_mixed_revisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("learned_vs_uniform")
    runs = _runs(FIVE)
    first = _directory(tmp_path / "a", [r for r in runs if r["agent"] != "ppo"], "a" * 40)
    second = _directory(tmp_path / "b", [r for r in runs if r["agent"] == "ppo"], "b" * 40 + "+dirty")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--report", str(first), str(second)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "a" * 40 in error and "b" * 40 + "+dirty" in error and str(first) in error and str(second) in error
    script.main(["--report", str(first), str(second), "--allow-mixed"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("MIXED (allowed): revisions differ")
    assert "headline: ppo − uniform" in out and "goal [m/d macs target 0.5]" in out
    assert {r["agent"] for r in load_paired(first / "paired.csv")} == {"uniform", "random", "ppo"}
