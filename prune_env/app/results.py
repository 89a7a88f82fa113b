"""Benchmark results: the tidy files a grid writes (``runs.csv``, ``evaluations.csv``, ``runs.json``),
read back as :class:`BenchmarkResults` with summary tables and plots (Pareto fronts, search curves)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prune_env.app.paired import (
    ALPHA,
    PAIRED_FIELDS,
    RANDOM,
    by_seed,
    comparisons,
    goals,
    headline,
    mean_std,
    paired_difference,
    setting_of,
)
from prune_env.app.plots import (
    UNIFORM,
    agent_colors,
    finish_figure,
    incumbent_accuracy,
    new_figure,
    pareto_front,
)
from prune_env.app.provenance import UNKNOWN, check_unmixed, mixed_lines
from prune_env.app.report import table_text, verdict_lines
from prune_env.app.tidy_files import (
    EVAL_FIELDS,
    EVAL_STR_FIELDS,
    RUN_FIELDS,
    RunKey,
    read_csv,
    run_key,
    write_csv,
)
from prune_env.errors import InvalidSettingError
from prune_env.validation import flag

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# Summarised per agent (mean and sample std over seeds): the proxy search's numbers, then the fine-tune's.
SUMMARY_COLUMNS = (
    "best_accuracy",
    "macs_ratio",
    "params_ratio",
    "latency_ratio",
    "latency_measured_ms",
    "measured_speedup",
    "val_accuracy",
    "test_accuracy",
    "seconds",
)
# The grid settings that make two runs' numbers comparable: the same evaluation budget, reward, budget
# metric, final fine-tune (length and training subset) and proxy.
COMPARABLE_SETTINGS = ("evals", "reward", "metric", "finetune_epochs", "finetune_samples", "problem_kwargs")


def load_paired(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows :meth:`BenchmarkResults.write_paired` wrote, with their numbers restored."""
    rows = read_csv(Path(path), {"model", "dataset", "metric", "agent", "reference", "role", "split"})
    return [{**r, "pairs": int(r["pairs"]), "family": int(r["family"])} for r in rows]


# ------------------------------------------------------------------------------------------------ results


@dataclass
class BenchmarkResults:
    """The rows of a benchmark grid: ``runs`` (one dict per run) and ``evaluations`` (one per evaluation),
    with the grid's ``settings`` (as saved in ``runs.json``).

    Columns are listed in :data:`RUN_FIELDS` and :data:`EVAL_FIELDS`. pandas is optional:
    :meth:`dataframes` converts when it is installed.
    """

    runs: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # One record per invocation that added runs (provenance.make_record), each with the "directory" it
    # was read from: where the results came from, and what a combination of them mixes.
    provenance: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> BenchmarkResults:
        """Read ``runs.csv``, ``evaluations.csv`` and the settings in ``runs.json`` from a benchmark directory."""
        out = Path(out)
        runs = read_csv(out / "runs.csv")
        keys = {run_key(r) for r in runs}
        # Evaluations of a run interrupted before its run row was written are not results: drop them.
        evals = [e for e in read_csv(out / "evaluations.csv", EVAL_STR_FIELDS) if run_key(e) in keys]
        saved = out / "runs.json"
        stored = json.loads(saved.read_text()) if saved.exists() else {}
        records = [{**r, "directory": str(out)} for r in stored.get("provenance", []) if isinstance(r, dict)]
        return cls(runs, evals, out, stored.get("settings", {}), records)

    def records(self) -> list[dict[str, Any]]:
        """:attr:`provenance`, plus a record (``"from_rows": True``) for each revision of a run row that no
        record names: runs written before provenance was recorded count as revision ``"unknown"``."""
        named = {r.get("revision") for r in self.provenance}
        extra = dict.fromkeys(
            r.get("revision") or UNKNOWN for r in self.runs if (r.get("revision") or UNKNOWN) not in named
        )
        where = str(self.out) if self.out is not None else "(in memory)"
        return [
            *self.provenance,
            *({"revision": rev, "directory": where, "from_rows": True} for rev in extra),
        ]

    @classmethod
    def combine(cls, parts: Sequence[BenchmarkResults], allow_mixed: bool = False) -> BenchmarkResults:
        """One set of results from grids run apart (a run directory belongs to one process, so a grid
        grown by two processes at once lives in two directories).

        The grids must agree on every setting in :data:`COMPARABLE_SETTINGS` that both recorded, or their
        numbers would be compared as equals when they are not (:class:`InvalidSettingError` names the
        setting). A run found in several parts (the same agent, model, dataset, target and seed) is taken
        from the first.

        Results of other code (another git revision; ``"unknown"`` for directories written before it was
        recorded) or of other agent settings are refused too, naming both values and their directories,
        unless ``allow_mixed``: then the table says what was mixed.
        """
        if not parts:
            raise InvalidSettingError("combine needs at least one BenchmarkResults")
        flag("allow_mixed", allow_mixed)
        first = parts[0]
        for part in parts[1:]:
            for key in COMPARABLE_SETTINGS:
                if (
                    key in first.settings
                    and key in part.settings
                    and first.settings[key] != part.settings[key]
                ):
                    raise InvalidSettingError(
                        f"{part.out} was run with {key}={part.settings[key]!r}, {first.out} with "
                        f"{first.settings[key]!r}: their runs are not comparable; combine grids made "
                        "with the same settings"
                    )
        runs: list[dict[str, Any]] = []
        evaluations: list[dict[str, Any]] = []
        seen: set[RunKey] = set()
        for part in parts:
            new = {run_key(r) for r in part.runs} - seen
            runs += [r for r in part.runs if run_key(r) in new]
            evaluations += [e for e in part.evaluations if run_key(e) in new]
            seen |= new
        records = [r for part in parts for r in part.records()]
        check_unmixed(records, allow_mixed)
        return cls(runs, evaluations, first.out, dict(first.settings), records)

    def __len__(self) -> int:
        return len(self.runs)

    def __repr__(self) -> str:
        return f"BenchmarkResults({len(self.runs)} runs, {len(self.evaluations)} evaluations, out={self.out})\n{self.table()}"

    def dataframes(self) -> tuple[Any, Any]:
        """``(runs, evaluations)`` as pandas DataFrames (needs pandas, which prune_env does not require)."""
        import pandas as pd

        return pd.DataFrame(self.runs, columns=list(RUN_FIELDS)), pd.DataFrame(
            self.evaluations, columns=list(EVAL_FIELDS)
        )

    @property
    def agents(self) -> list[str]:
        return list(dict.fromkeys(r["agent"] for r in self.runs))

    # -- table ------------------------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """One dict per (model, dataset, metric, target, agent): mean and sample std (ddof=1; NaN for one
        seed) over seeds of the run metrics, including the fine-tuned validation and test accuracy."""
        groups: dict[tuple[str, str, str, float, str], list[dict[str, Any]]] = {}
        for r in self.runs:
            groups.setdefault((*setting_of(r), r["agent"]), []).append(r)
        rows = []
        for (model, dataset, metric, target, agent), rs in groups.items():
            row: dict[str, Any] = {
                "model": model, "dataset": dataset, "metric": metric, "target": target, "agent": agent,
                "seeds": len(rs), "evals": float(np.mean([r["evals_used"] for r in rs])),
            }  # fmt: skip
            for col in SUMMARY_COLUMNS:
                row[col], row[col + "_std"] = mean_std([_float(r.get(col)) for r in rs])
            rows.append(row)
        return rows

    def paired(self, reference: str = UNIFORM, column: str = "test_accuracy") -> list[dict[str, Any]]:
        """Each agent against ``reference`` on ``column``, run by run: per (model, dataset, metric, target,
        agent), the mean of (agent − reference) over the seeds both ran, its 95% confidence interval
        (Student's t; NaN with fewer than two such seeds) and the paired t-test's p-value. Pairing by seed
        compares the fine-tunes made with the same seed, so the fine-tune's own noise largely cancels."""
        values = by_seed(self.runs, column)
        rows = []
        for (setting, agent), mine in values.items():
            theirs = values.get((setting, reference))
            if agent == reference or theirs is None:
                continue
            model, dataset, metric, target = setting
            rows.append(
                {
                    "model": model, "dataset": dataset, "metric": metric, "target": target, "agent": agent,
                    "reference": reference, "column": column, **paired_difference(mine, theirs),
                }
            )  # fmt: skip
        return rows

    def comparisons(
        self, references: Sequence[str] = (UNIFORM, RANDOM), best: bool = True
    ) -> list[dict[str, Any]]:
        """Every agent against each of ``references`` and (``best``) its setting's best non-learned baseline
        (by mean validation accuracy), on validation and test, with Holm-adjusted p-values over all of
        them (:func:`prune_env.app.paired.comparisons`)."""
        return comparisons(self.runs, references, best)

    def table(self, references: Sequence[str] = (UNIFORM,), best: bool = True) -> str:
        """Plain-text table: per model, dataset, metric, target and agent, mean ± sample std over seeds, and
        — when runs were fine-tuned — one line per split (validation, test) with the paired difference to
        each reference agent that ran, and to the setting's best non-learned baseline (``best``; named
        beneath the table), with 95% confidence intervals (e.g. ``references=("uniform", "random")``:
        learned allocation against none, and against plain search). What the results mix (revisions,
        agent settings) is said above the table."""
        return table_text(
            self.summary(), self.comparisons(references, best), references, mixed_lines(self.records())
        )

    def verdicts(
        self, references: Sequence[str] = (UNIFORM, RANDOM), alpha: float = ALPHA, **thresholds: Any
    ) -> str:
        """The headline (the largest learned-minus-best-baseline test difference) checked on validation
        and test after the Holm correction over :meth:`comparisons`, then each goal of
        :func:`prune_env.app.paired.goals` per setting (``thresholds``: its keyword arguments)."""
        rows = self.comparisons(references)
        lines = verdict_lines(headline(rows, alpha), goals(rows, **thresholds))
        return "\n".join([*lines, *latency_lines(self.runs)])

    def write_paired(
        self, path: str | os.PathLike[str] | None = None, references: Sequence[str] = (UNIFORM, RANDOM)
    ) -> Path:
        """Write :meth:`comparisons` to ``path`` (default ``paired.csv`` beside ``runs.csv``) so the
        report's numbers can be read back (:func:`load_paired`); returns the path."""
        if path is None and self.out is None:
            raise InvalidSettingError("these results have no directory: give write_paired a path")
        target = Path(path) if path is not None else Path(str(self.out)) / "paired.csv"
        write_csv(target, PAIRED_FIELDS, self.comparisons(references))
        return target

    # -- plots ------------------------------------------------------------------------------------
    def _panels(self, keys: Sequence[str]) -> list[tuple[Any, ...]]:
        return list(dict.fromkeys(tuple(r[k] for k in keys) for r in self.runs))

    def plot_pareto(self, path: str | os.PathLike[str] | None = None) -> Figure:
        """Proxy accuracy vs cost ratio: every evaluation as a faint point per agent, each agent's Pareto
        front (best accuracy at no more than a given cost) as a line, and the uniform policy as the
        reference (a horizontal line for one target, a dashed line through its points for several).

        One panel per (model, dataset); the cost is the one the runs' budget limits (parameters for a
        ``"params"`` budget, MACs otherwise). Saved to ``path`` when given.
        """
        panels = self._panels(("model", "dataset"))
        fig, axes = new_figure(len(panels))
        for ax, (model, dataset) in zip(axes, panels, strict=True):
            evals = [e for e in self.evaluations if e["model"] == model and e["dataset"] == dataset]
            runs = [r for r in self.runs if r["model"] == model and r["dataset"] == dataset]
            colors = agent_colors(self.agents)
            # One directory holds one metric (the harness refuses to mix them).
            cost = "params" if runs and runs[0]["metric"] == "params" else "macs"
            for agent in self.agents:
                pts = np.array([(e[f"{cost}_ratio"], e["accuracy"]) for e in evals if e["agent"] == agent])
                if agent == UNIFORM or not len(pts):
                    continue
                color = colors[agent]
                ax.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.35, color=color, linewidths=0)
                front = pareto_front(pts[:, 0], pts[:, 1])
                ax.plot(front[:, 0], front[:, 1], drawstyle="steps-post", color=color, lw=1.8, label=agent)
            # Uniform is deterministic: one reference point per target (seeds only repeat it).
            by_target: dict[float, list[tuple[float, float]]] = {}
            for r in runs:
                if r["agent"] == UNIFORM:
                    by_target.setdefault(float(r["target"]), []).append(
                        (r[f"{cost}_ratio"], r["best_accuracy"])
                    )
            ref = np.array([np.mean(v, axis=0) for _, v in sorted(by_target.items())]).reshape(-1, 2)
            if len(ref) == 1:
                ax.axhline(ref[0, 1], color="k", ls="--", lw=1, label=UNIFORM)
                ax.plot(ref[:, 0], ref[:, 1], "ko", ms=5)
            elif len(ref):
                ax.plot(ref[:, 0], ref[:, 1], "k--o", lw=1, ms=5, label=UNIFORM)
            label = {"macs": "MACs / base MACs", "params": "parameters / base parameters"}[cost]
            ax.set(xlabel=label, ylabel="proxy accuracy", title=f"{model} on {dataset}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        return finish_figure(fig, path)

    def plot_curves(self, path: str | os.PathLike[str] | None = None) -> Figure:
        """Learning curves: proxy accuracy of the best policy found so far vs evaluations spent.

        One line per agent (mean over seeds) with a min–max band over seeds; one panel per (model,
        dataset, target). A search that stopped early (uniform spends one evaluation) keeps its best to
        the end of the panel's budget. Saved to ``path`` when given.
        """
        from matplotlib.ticker import MaxNLocator

        panels = self._panels(("model", "dataset", "target"))
        fig, axes = new_figure(len(panels))
        for ax, (model, dataset, target) in zip(axes, panels, strict=True):
            curves: dict[str, list[np.ndarray]] = {}
            for r in self.runs:
                if (r["model"], r["dataset"], r["target"]) != (model, dataset, target):
                    continue
                key = run_key(r)
                hist = sorted((e for e in self.evaluations if run_key(e) == key), key=lambda e: e["index"])
                if hist:
                    curves.setdefault(r["agent"], []).append(incumbent_accuracy(hist))
            length = max((len(c) for cs in curves.values() for c in cs), default=1)
            x = np.arange(1, length + 1)
            colors = agent_colors(self.agents)
            for agent in self.agents:
                if agent not in curves:
                    continue
                # Pad with the last value: after a search stops, its best policy stays its answer.
                ys = np.array([np.pad(c, (0, length - len(c)), mode="edge") for c in curves[agent]])
                color = colors[agent]
                ls = "--" if agent == UNIFORM else "-"
                ax.plot(x, ys.mean(0), color=color, ls=ls, lw=1.8, label=f"{agent} (n={len(ys)})")
                if len(ys) > 1:
                    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, linewidth=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(
                xlabel="evaluations spent",
                ylabel="proxy accuracy of best so far",
                title=f"{model} on {dataset}, target {target:g}",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        return finish_figure(fig, path)


def latency_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Under a latency budget, per setting: the final models' measured latency ratios (each against the
    base model measured right after it) and how many exceed the target by more than their measurement's
    own spread (interquartile range / median): what the table promised against what the machine gave."""
    lines = []
    by_setting: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for r in runs:
        if r.get("metric") == "latency" and math.isfinite(_float(r.get("latency_measured_ms"))):
            by_setting.setdefault((str(r["model"]), str(r["dataset"]), float(r["target"])), []).append(r)
    for (model, dataset, target), rs in by_setting.items():
        ratios = np.array(
            [_float(r["latency_measured_ms"]) / _float(r["base_latency_measured_ms"]) for r in rs]
        )
        spread = np.array(
            [_float(r["latency_measured_iqr_ms"]) / _float(r["latency_measured_ms"]) for r in rs]
        )
        over = int(np.sum(ratios > target * (1.0 + spread)))
        errors = np.abs([_float(r["latency_prediction_error"]) for r in rs])
        noisy = int(sum(bool(r.get("latency_measured_noisy")) for r in rs))
        # Rows that carry the table's noise (how far the protocol's repeated measurements of one model move)
        # are also held to it: the bound the goal names, wider than one measurement's own spread.
        noise = np.array([_float(r.get("latency_protocol_noise")) for r in rs])
        beyond_noise = (
            f"; {int(np.sum(ratios > target * (1.0 + noise)))} beyond the protocol's noise "
            f"({np.median(noise):.1%})"
            if np.all(np.isfinite(noise))
            else ""
        )
        lines.append(
            f"latency {model}/{dataset} target {target:g}: measured ratio median {np.median(ratios):.3f}, max "
            f"{ratios.max():.3f}; {over} of {len(rs)} final models above the target beyond their measurement's "
            f"spread{beyond_noise}; prediction |error| median {np.median(errors):.1%}, max {errors.max():.1%}"
            + (f"; {noisy} measurement(s) disturbed" if noisy else "")
        )
    return lines


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
