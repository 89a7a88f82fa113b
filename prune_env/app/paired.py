"""Paired comparisons of benchmark agents, seed by seed, and the checks a reviewer asks of them.

Two agents that ran the same seeds of one setting (model, dataset, budget metric, target) are compared by
the mean of their per-seed differences with a Student-t interval: the final fine-tune of a seed uses the
same seed for every agent, so much of its noise cancels in the difference. Each agent is compared on the
validation and the test split against uniform, against random search and against the *best non-learned
baseline* of its setting: the one of :data:`BASELINES` with the highest mean **validation** accuracy (the
test split picks nothing, or the baseline would be chosen on the numbers it is judged by).

The paired t-tests of one table form one family: :func:`holm` adjusts their p-values (Holm–Bonferroni),
so a claim checked with :func:`check_claims` survives only if it holds after accounting for every
comparison the table makes. :func:`goals` states the project's two goals per setting with their thresholds
as parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prune_env.errors import InvalidSettingError

SPLITS = {"val": "val_accuracy", "test": "test_accuracy"}  # split -> run column (after the fine-tune)
BASELINES = ("uniform", "global", "knapsack", "sensitivity")  # allocations that learn nothing
RL_AGENTS = ("ppo", "a2c", "sac", "td3", "ddpg", "amc", "rlpruner")
LEARNED = (*RL_AGENTS, "evolution", "predictor")  # random search counts as a non-learned search
RANDOM = "random"
BEST = "best baseline"  # the role of the best non-learned baseline of a setting
CONFIDENCE = 0.95
ALPHA = 0.05
PAIRED_FIELDS = (
    "model", "dataset", "metric", "target", "agent", "reference", "role", "split", "pairs",
    "mean_difference", "sd", "ci_low", "ci_high", "t", "p", "p_holm", "family",
)  # fmt: skip

Setting = tuple[str, str, str, float]  # model, dataset, budget metric, target


def setting_of(row: Mapping[str, Any]) -> Setting:
    """A run's setting; runs written without a metric column have metric ``""``."""
    return (str(row["model"]), str(row["dataset"]), str(row.get("metric") or ""), float(row["target"]))


def setting_label(setting: Setting) -> str:
    model, dataset, metric, target = setting
    return f"{model}/{dataset}{f' {metric}' if metric else ''} target {target:g}"


def _finite(value: Any) -> float:
    try:
        found = float(value)
    except (TypeError, ValueError):
        return math.nan
    return found if math.isfinite(found) else math.nan


def by_seed(runs: Iterable[Mapping[str, Any]], column: str) -> dict[tuple[Setting, str], dict[int, float]]:
    """``{(setting, agent): {seed: value}}`` of the finite values of ``column``."""
    found: dict[tuple[Setting, str], dict[int, float]] = {}
    for r in runs:
        value = _finite(r.get(column))
        if not math.isnan(value):
            found.setdefault((setting_of(r), str(r["agent"])), {})[int(r["seed"])] = value
    return found


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    array = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    mean = float(array.mean()) if array.size else math.nan
    return mean, float(array.std(ddof=1)) if array.size > 1 else math.nan


def paired_difference(
    values: Mapping[int, float], reference: Mapping[int, float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Mean of ``values[s] - reference[s]`` over the seeds ``s`` both have, with its Student-t interval at
    ``confidence`` and the two-sided paired t-test's p-value (NaN below two pairs). Equal differences
    (no spread) give p = 0 when their mean is not zero, 1 when it is."""
    from scipy import stats  # a dependency of prune_env; imported when a table needs it

    if not 0.0 < confidence < 1.0:
        raise InvalidSettingError(f"confidence must be in (0, 1), got {confidence!r}")
    seeds = sorted(set(values) & set(reference))
    diff = np.array([values[s] - reference[s] for s in seeds], dtype=np.float64)
    n = diff.size
    mean = float(diff.mean()) if n else math.nan
    sd = half = t = p = math.nan
    if n > 1:
        sd = float(diff.std(ddof=1))
        se = sd / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
        if se > 0:
            t = mean / se
            p = float(2.0 * stats.t.sf(abs(t), n - 1))
        else:
            t = math.copysign(math.inf, mean) if mean else 0.0
            p = 0.0 if mean else 1.0
    return {
        "pairs": n, "mean_difference": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half,
        "t": t, "p": p,
    }  # fmt: skip


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given: the i-th smallest of m is multiplied by
    m - i + 1, made non-decreasing, and capped at 1. NaN (an untestable comparison) stays NaN and is not
    counted in m."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    if any(not 0.0 <= p <= 1.0 for p, _ in ranked):
        raise InvalidSettingError(f"p-values must be in [0, 1], got {list(pvalues)}")
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def best_baseline(
    runs: Iterable[Mapping[str, Any]], setting: Setting, baselines: Sequence[str] = BASELINES
) -> str | None:
    """The agent of ``baselines`` with the highest mean validation accuracy in ``setting`` (the earlier
    listed on a tie); ``None`` when none has one. The test split is never consulted."""
    values = by_seed(runs, SPLITS["val"])
    means = {a: mean_std(list(values[(setting, a)].values()))[0] for a in baselines if (setting, a) in values}
    return max(means, key=lambda a: (means[a], -baselines.index(a)), default=None)


def comparisons(
    runs: Sequence[Mapping[str, Any]],
    references: Sequence[str] = ("uniform", RANDOM),
    best: bool = True,
    baselines: Sequence[str] = BASELINES,
    confidence: float = CONFIDENCE,
) -> list[dict[str, Any]]:
    """Every agent of every setting against each of ``references`` and (``best``) the setting's best
    non-learned baseline, on each split: one row per comparison (:data:`PAIRED_FIELDS`).

    ``p_holm`` adjusts ``p`` over the family of distinct comparisons (setting, agent, reference agent,
    split) of all the rows: a reference that is also the best baseline is one comparison, not two;
    ``family`` is its size.
    """
    values = {split: by_seed(runs, column) for split, column in SPLITS.items()}
    order: dict[Setting, list[str]] = {}
    for r in runs:
        agents = order.setdefault(setting_of(r), [])
        if str(r["agent"]) not in agents:
            agents.append(str(r["agent"]))
    rows: list[dict[str, Any]] = []
    for setting, agents in order.items():
        roles = [(str(ref), str(ref)) for ref in references]
        if best and (name := best_baseline(runs, setting, baselines)) is not None:
            roles.append((BEST, name))
        for agent in agents:
            for role, reference in roles:
                for split in SPLITS:
                    mine, theirs = (
                        values[split].get((setting, agent)),
                        values[split].get((setting, reference)),
                    )
                    if agent == reference or not mine or not theirs:
                        continue
                    found = paired_difference(mine, theirs, confidence)
                    if found["pairs"]:
                        model, dataset, metric, target = setting
                        rows.append(
                            {
                                "model": model, "dataset": dataset, "metric": metric, "target": target,
                                "agent": agent, "reference": reference, "role": role, "split": split,
                                **found,
                            }
                        )  # fmt: skip
    family: dict[tuple[Any, ...], float] = {}
    for row in rows:
        family.setdefault(_comparison(row), row["p"])
    adjusted = dict(zip(family, holm(list(family.values())), strict=True))
    size = sum(not math.isnan(p) for p in family.values())
    for row in rows:
        row["p_holm"], row["family"] = adjusted[_comparison(row)], size
    return rows


def _comparison(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (setting_of(row), row["agent"], row["reference"], row["split"])


@dataclass(frozen=True)
class Claim:
    """ "``agent`` beats ``reference`` on every split of ``splits``" (in ``setting``, or in every setting
    where the table compares them). ``reference``: an agent, or :data:`BEST` for each setting's best
    non-learned baseline."""

    agent: str
    reference: str = BEST
    splits: tuple[str, ...] = ("val", "test")
    setting: Setting | None = None

    def __post_init__(self) -> None:
        for name in ("agent", "reference"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidSettingError(
                    f"a claim's {name} must be an agent's name, got {getattr(self, name)!r}"
                )
        if not self.splits or any(s not in SPLITS for s in self.splits) or isinstance(self.splits, str):
            raise InvalidSettingError(
                f"a claim's splits must be a non-empty tuple of {', '.join(map(repr, SPLITS))}, got {self.splits!r}"
            )


def check_claims(
    rows: Sequence[Mapping[str, Any]],
    claims: Sequence[Claim] | None = None,
    alpha: float = ALPHA,
    learned: Sequence[str] = LEARNED,
) -> list[dict[str, Any]]:
    """Whether each claim survives the Holm correction of the table ``rows`` come from (:func:`comparisons`):
    on every split of the claim the difference is positive and its Holm-adjusted p-value below ``alpha``.

    ``claims``: by default, each agent of ``learned`` that the table compares with a best non-learned
    baseline, against it on validation and test. Returns one dict per claim and setting: the setting, ``agent``,
    ``reference`` (the baseline's name for :data:`BEST`), ``splits`` (the compared rows, by split),
    ``survives`` and, when it does not, ``reason``.
    """
    if not 0.0 < alpha < 1.0:
        raise InvalidSettingError(f"alpha must be in (0, 1), got {alpha!r}")
    if claims is None:
        compared = {str(r["agent"]) for r in rows if r["role"] == BEST}
        claims = [Claim(a) for a in learned if a in compared]
    verdicts = []
    for claim in claims:
        matching = [
            r
            for r in rows
            if r["agent"] == claim.agent
            and (r["role"] == BEST if claim.reference == BEST else r["reference"] == claim.reference)
            and (claim.setting is None or setting_of(r) == tuple(claim.setting))
        ]
        if not matching:
            raise InvalidSettingError(
                f"the table does not compare {claim.agent!r} with {claim.reference!r}"
                f"{'' if claim.setting is None else ' in ' + setting_label(claim.setting)}; "
                "compare them first (comparisons(references=...))"
            )
        for setting in dict.fromkeys(setting_of(r) for r in matching):
            found = {r["split"]: r for r in matching if setting_of(r) == setting}
            reasons = []
            for split in claim.splits:
                row = found.get(split)
                if row is None:
                    reasons.append(f"no {split} comparison")
                elif math.isnan(row["p_holm"]):
                    reasons.append(f"{split}: {row['pairs']} pair(s), too few to test")
                elif row["mean_difference"] <= 0 or row["p_holm"] >= alpha:
                    reasons.append(
                        f"{split}: difference {row['mean_difference']:+.4f}, Holm p {row['p_holm']:.3g}"
                    )
            reference = next(iter(found.values()))["reference"]
            verdicts.append(
                {
                    "model": setting[0], "dataset": setting[1], "metric": setting[2], "target": setting[3],
                    "agent": claim.agent, "reference": reference, "role": claim.reference,
                    "splits": {s: found[s] for s in claim.splits if s in found},
                    "survives": not reasons, "reason": "; ".join(reasons), "alpha": alpha,
                }
            )  # fmt: skip
    return verdicts


def headline(
    rows: Sequence[Mapping[str, Any]], alpha: float = ALPHA, learned: Sequence[str] = LEARNED
) -> dict[str, Any] | None:
    """The table's headline, checked: the largest test difference of a learned agent over its setting's
    best non-learned baseline, as a claim on validation and test (:func:`check_claims`); ``None`` when
    the table has no such comparison."""
    candidates = [
        r
        for r in rows
        if r["role"] == BEST and r["split"] == "test" and r["agent"] in learned
        and not math.isnan(r["mean_difference"])
    ]  # fmt: skip
    if not candidates:
        return None
    top = max(candidates, key=lambda r: r["mean_difference"])
    claim = Claim(str(top["agent"]), BEST, ("val", "test"), setting_of(top))
    return check_claims(rows, [claim], alpha, learned)[0]


def goals(
    rows: Sequence[Mapping[str, Any]],
    *,
    learned: Sequence[str] = LEARNED,
    rl_agents: Sequence[str] = RL_AGENTS,
    learned_margin: float = 0.01,
    rl_margin: float = 0.005,
    min_seeds: int = 5,
) -> list[dict[str, Any]]:
    """The project's goals, per setting of the table ``rows`` come from (:func:`comparisons`):

    - a learned agent beats the best non-learned baseline by at least ``learned_margin`` of test accuracy
      (0.01: one point), with the 95% interval above zero on validation and on test, over at least
      ``min_seeds`` paired seeds;
    - an RL agent beats random search by at least ``rl_margin`` of test accuracy (0.005: half a point)
      with the interval above zero on both splits, over at least ``min_seeds`` paired seeds.

    One dict per setting and goal: ``goal``, ``met``, the ``agent`` that meets it (or came closest: the
    largest test difference) with its ``val`` and ``test`` rows, and ``reason`` when it is not met.
    """
    for name, value in (("learned_margin", learned_margin), ("rl_margin", rl_margin)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise InvalidSettingError(f"{name} must be a finite accuracy difference >= 0, got {value!r}")
    if isinstance(min_seeds, bool) or not isinstance(min_seeds, int) or min_seeds < 2:
        raise InvalidSettingError(
            f"min_seeds must be an integer >= 2 (an interval needs two), got {min_seeds!r}"
        )
    both = f"95% CI > 0 on val and test, n >= {min_seeds}"
    targets = (
        (f"learned beats the best non-learned baseline by >= {100 * learned_margin:g} pt of test accuracy, {both}",
         learned, BEST, learned_margin),
        (f"RL beats random by >= {100 * rl_margin:g} pt of test accuracy, {both}", rl_agents, RANDOM, rl_margin),
    )  # fmt: skip
    found = []
    for setting in dict.fromkeys(setting_of(r) for r in rows):
        here = [r for r in rows if setting_of(r) == setting]
        for goal, agents, role, margin in targets:
            pairs: dict[str, dict[str, Mapping[str, Any]]] = {}
            for r in here:
                if r["agent"] in agents and r["role"] == role:
                    pairs.setdefault(str(r["agent"]), {})[str(r["split"])] = r
            complete = {a: p for a, p in pairs.items() if {"val", "test"} <= set(p)}
            verdicts = [(a, _goal_reason(p, margin, min_seeds)) for a, p in complete.items()]
            meeting = [a for a, reason in verdicts if not reason]
            ranked = sorted(complete, key=lambda a: -_finite(complete[a]["test"]["mean_difference"]))
            agent = max(meeting, key=lambda a: complete[a]["test"]["mean_difference"]) if meeting else None
            agent = agent or (ranked[0] if ranked else None)
            reason = (
                "" if meeting else dict(verdicts).get(agent or "", "no such agent compared on both splits")
            )
            found.append(
                {
                    "model": setting[0], "dataset": setting[1], "metric": setting[2], "target": setting[3],
                    "goal": goal, "met": bool(meeting), "agent": agent,
                    "reference": complete[agent]["test"]["reference"] if agent else None,
                    "val": complete[agent]["val"] if agent else None,
                    "test": complete[agent]["test"] if agent else None, "reason": reason,
                }
            )  # fmt: skip
    return found


def _goal_reason(by_split: Mapping[str, Mapping[str, Any]], margin: float, min_seeds: int) -> str:
    """Why a comparison misses a goal ("" when it meets it)."""
    reasons = []
    pairs = min(int(by_split[s]["pairs"]) for s in ("val", "test"))
    if pairs < min_seeds:
        reasons.append(f"{pairs} paired seeds < {min_seeds}")
    test = by_split["test"]["mean_difference"]
    if not test >= margin:
        reasons.append(f"test {100 * test:+.2f} pt < {100 * margin:g} pt")
    for split in ("val", "test"):
        low = by_split[split]["ci_low"]
        if not low > 0:
            reasons.append(f"{split} interval low {100 * low:+.2f} pt not above 0")
    return "; ".join(reasons)


__all__ = [
    "ALPHA",
    "BASELINES",
    "BEST",
    "CONFIDENCE",
    "LEARNED",
    "PAIRED_FIELDS",
    "RANDOM",
    "RL_AGENTS",
    "SPLITS",
    "Claim",
    "best_baseline",
    "by_seed",
    "check_claims",
    "comparisons",
    "goals",
    "headline",
    "holm",
    "mean_std",
    "paired_difference",
    "setting_label",
    "setting_of",
]
