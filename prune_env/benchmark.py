"""Benchmark harness: run a grid of agents × models × datasets × targets × seeds at equal evaluation budgets.

::

    from prune_env import benchmark

    results = benchmark.run(["uniform", "random", "ppo"], targets=(0.3, 0.5), seeds=(0, 1, 2), evals=100)
    print(results.table())
    results.plot_pareto("pareto.png")
    results.plot_curves("curves.png")

For each (model, dataset, target) ONE :class:`~prune_env.problem.PruningProblem` is built and shared by
every agent and seed, so all runs see the same base model, dependency graph, channel ranking and proxy;
every agent then gets a fresh :class:`~agents.base.BudgetedEvaluator` with the same budget. Optionally each
run's best policy is fine-tuned identically (knowledge distillation from the base model) and scored on the
test split — the only place the test split is read.

Results are tidy files under ``out``: ``runs.csv`` (one row per run), ``evaluations.csv`` (one row per
evaluation, keyed by the run's columns) and ``runs.json`` (the run rows plus the grid settings). A run's
rows are written as soon as it finishes, so an interrupted grid loses at most the run in progress, and
calling :func:`run` again with the same ``out`` skips every run already in ``runs.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prune_env.errors import InvalidSettingError
from prune_env.problem import check_model_arg
from prune_env.rewards import get_reward
from prune_env.rundir import RunDirectory
from prune_env.serialize import json_default
from prune_env.validation import check_sequence, check_settings

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from prune_env.data import Splits
    from prune_env.problem import ModelArg, PruningProblem
    from prune_env.rewards import RewardFn

RUN_KEYS = ("agent", "model", "dataset", "target", "seed")
RUN_FIELDS = (
    *RUN_KEYS,
    "metric",
    "reward",
    "budget_evals",
    "evals_used",
    "best_reward",
    "best_accuracy",  # proxy accuracy (validation subset) of the best-reward policy
    "macs_ratio",
    "params_ratio",
    "base_accuracy",  # proxy accuracy of the unpruned model
    "finetune_epochs",
    "val_accuracy",  # after the final fine-tune; blank when finetune_epochs == 0
    "test_accuracy",  # after the final fine-tune; blank when finetune_epochs == 0
    "seconds",  # search plus fine-tune; memo hits on the shared problem make later runs faster
    "ratios",  # of the best policy, one per group
    "keep",  # kept units per group of the best policy
)
EVAL_FIELDS = (
    *RUN_KEYS,
    "index",
    "reward",
    "accuracy",
    "loss",
    "macs_ratio",
    "params_ratio",
    "seconds",
    "ratios",
    "keep",
)
_INT_FIELDS = {"seed", "budget_evals", "evals_used", "finetune_epochs", "index"}
_STR_FIELDS = {"agent", "model", "dataset", "metric", "reward", "ratios", "keep"}
UNIFORM = "uniform"  # the reference agent in plots

RunKey = tuple[str, str, str, float, int]


def _run_key(row: Mapping[str, Any]) -> RunKey:
    # Normalised types: rows read back from CSV carry strings, fresh rows carry numbers.
    return (str(row["agent"]), str(row["model"]), str(row["dataset"]), float(row["target"]), int(row["seed"]))


def _parse(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row with its numbers restored (blank numeric cells become NaN)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in _STR_FIELDS:
            out[k] = v
        elif k in _INT_FIELDS:
            out[k] = int(v) if v != "" else None
        else:
            try:
                out[k] = float(v) if v != "" else math.nan
            except ValueError:  # an unknown textual column (a user's extra field): keep it as text
                out[k] = v
    return out


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [_parse(r) for r in csv.DictReader(f)]


def _cell(v: Any) -> Any:
    # Blank instead of "nan": the tidy convention for "not measured", and pandas reads it back as NaN.
    return "" if isinstance(v, float) and math.isnan(v) else v


def _append_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k, "")) for k in fields})
        f.flush()
        os.fsync(f.fileno())  # the point of appending per run: survive a kill right after it


def _write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` atomically: a kill mid-write leaves the old file, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _append_csv(tmp, fields, rows)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic replace: a reader (or a resumed grid) never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(v: Any) -> Any:
    try:
        return json_default(v)
    except TypeError:
        return str(v)  # settings may hold objects (a custom proxy): record their description


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


# ------------------------------------------------------------------------------------------------ labels


def _label(obj: Any, what: str) -> str:
    if isinstance(obj, str):
        return obj
    name = getattr(obj, "name", None)
    if what == "dataset" and isinstance(name, str):  # a Splits knows its dataset's name
        return name
    name = getattr(obj, "__name__", None)  # functions and classes
    if name:
        return str(name)
    # Instances: a reward's repr shows its parameters (``Lagrangian(lam=1.0)``); a module's would be huge.
    return repr(obj) if what == "reward" else type(obj).__name__


def _labelled(items: Sequence[Any] | Mapping[str, Any] | Any, what: str) -> list[tuple[str, Any]]:
    """``[(label, item)]``: a mapping gives its own labels; strings, Splits and callables are named."""
    if isinstance(items, Mapping):
        return [(str(k), v) for k, v in items.items()]
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        items = [items]
    pairs = [(_label(x, what), x) for x in items]
    labels = [p[0] for p in pairs]
    if len(set(labels)) != len(labels):
        raise InvalidSettingError(
            f"{what} labels must be unique, got {labels}; pass a dict {{label: {what}}}"
        )
    return pairs


# ------------------------------------------------------------------------------------------------ results


@dataclass
class BenchmarkResults:
    """The rows of a benchmark grid: ``runs`` (one dict per run) and ``evaluations`` (one per evaluation).

    Columns are listed in :data:`RUN_FIELDS` and :data:`EVAL_FIELDS`. pandas is optional:
    :meth:`dataframes` converts when it is installed.
    """

    runs: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None

    @classmethod
    def load(cls, out: str | os.PathLike) -> BenchmarkResults:
        """Read ``runs.csv`` and ``evaluations.csv`` from a benchmark directory."""
        out = Path(out)
        runs = _read_csv(out / "runs.csv")
        keys = {_run_key(r) for r in runs}
        # Evaluations of a run interrupted before its run row was written are not results: drop them.
        evals = [e for e in _read_csv(out / "evaluations.csv") if _run_key(e) in keys]
        return cls(runs, evals, out)

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
        """One dict per (model, dataset, target, agent): mean and std over seeds of the run metrics."""
        groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
        for r in self.runs:
            groups.setdefault((r["model"], r["dataset"], float(r["target"]), r["agent"]), []).append(r)
        rows = []
        for (model, dataset, target, agent), rs in groups.items():
            row: dict[str, Any] = {"model": model, "dataset": dataset, "target": target, "agent": agent}
            row["seeds"] = len(rs)
            row["evals"] = float(np.mean([r["evals_used"] for r in rs]))
            for col in ("best_accuracy", "macs_ratio", "params_ratio", "test_accuracy", "seconds"):
                vals = np.array([_float(r.get(col)) for r in rs], dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                row[col] = float(vals.mean()) if vals.size else math.nan
                row[col + "_std"] = float(vals.std()) if vals.size else math.nan
            rows.append(row)
        return rows

    def table(self) -> str:
        """Plain-text table: per model, dataset, target and agent, mean ± std over seeds."""
        if not self.runs:
            return "(no runs)"
        summary = self.summary()
        multi = len({(s["model"], s["dataset"]) for s in summary}) > 1
        head = ["model", "dataset"] if multi else []
        header = [
            *head,
            "target",
            "agent",
            "seeds",
            "evals",
            "proxy acc",
            "MACs",
            "params",
            "test acc (ft)",
            "s/run",
        ]
        lines = []
        for s in summary:
            lines.append(
                [
                    *([s["model"], s["dataset"]] if multi else []),
                    f"{s['target']:g}",
                    s["agent"],
                    str(s["seeds"]),
                    f"{s['evals']:.0f}",
                    _pm(s["best_accuracy"], s["best_accuracy_std"]),
                    f"{s['macs_ratio']:.3f}",
                    f"{s['params_ratio']:.3f}",
                    _pm(s["test_accuracy"], s["test_accuracy_std"]),
                    f"{s['seconds']:.1f}",
                ]
            )
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < len(head) + 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        if not multi:
            out.insert(0, f"{summary[0]['model']} on {summary[0]['dataset']}")
        return "\n".join(out)

    # -- plots ------------------------------------------------------------------------------------
    def _panels(self, keys: Sequence[str]) -> list[tuple[Any, ...]]:
        return list(dict.fromkeys(tuple(r[k] for k in keys) for r in self.runs))

    def plot_pareto(self, path: str | os.PathLike | None = None) -> Figure:
        """Proxy accuracy vs MACs ratio: every evaluation as a faint point per agent, each agent's Pareto
        front (best accuracy at no more than a given cost) as a line, and the uniform policy as the
        reference (a horizontal line for one target, a dashed line through its points for several).

        One panel per (model, dataset). Saved to ``path`` when given.
        """
        panels = self._panels(("model", "dataset"))
        fig, axes = _figure(len(panels))
        for ax, (model, dataset) in zip(axes, panels, strict=True):
            evals = [e for e in self.evaluations if e["model"] == model and e["dataset"] == dataset]
            runs = [r for r in self.runs if r["model"] == model and r["dataset"] == dataset]
            colors = _colors(self.agents)
            for agent in self.agents:
                pts = np.array([(e["macs_ratio"], e["accuracy"]) for e in evals if e["agent"] == agent])
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
                    by_target.setdefault(float(r["target"]), []).append((r["macs_ratio"], r["best_accuracy"]))
            ref = np.array([np.mean(v, axis=0) for _, v in sorted(by_target.items())]).reshape(-1, 2)
            if len(ref) == 1:
                ax.axhline(ref[0, 1], color="k", ls="--", lw=1, label=UNIFORM)
                ax.plot(ref[:, 0], ref[:, 1], "ko", ms=5)
            elif len(ref):
                ax.plot(ref[:, 0], ref[:, 1], "k--o", lw=1, ms=5, label=UNIFORM)
            ax.set(xlabel="MACs / base MACs", ylabel="proxy accuracy", title=f"{model} on {dataset}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        return _finish(fig, path)

    def plot_curves(self, path: str | os.PathLike | None = None) -> Figure:
        """Learning curves: proxy accuracy of the best policy found so far vs evaluations spent.

        One line per agent (mean over seeds) with a min–max band over seeds; one panel per (model,
        dataset, target). A search that stopped early (uniform spends one evaluation) keeps its best to
        the end of the panel's budget. Saved to ``path`` when given.
        """
        from matplotlib.ticker import MaxNLocator

        panels = self._panels(("model", "dataset", "target"))
        fig, axes = _figure(len(panels))
        for ax, (model, dataset, target) in zip(axes, panels, strict=True):
            curves: dict[str, list[np.ndarray]] = {}
            for r in self.runs:
                if (r["model"], r["dataset"], r["target"]) != (model, dataset, target):
                    continue
                key = _run_key(r)
                hist = sorted((e for e in self.evaluations if _run_key(e) == key), key=lambda e: e["index"])
                if hist:
                    curves.setdefault(r["agent"], []).append(incumbent_accuracy(hist))
            length = max((len(c) for cs in curves.values() for c in cs), default=1)
            x = np.arange(1, length + 1)
            colors = _colors(self.agents)
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
        return _finish(fig, path)


def _colors(agents: Sequence[str]) -> dict[str, str]:
    """The same colour for an agent in every plot; uniform, the reference, in black."""
    others = [a for a in agents if a != UNIFORM]
    return {UNIFORM: "k", **{a: f"C{i % 10}" for i, a in enumerate(others)}}


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _pm(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def _figure(n: int) -> tuple[Figure, list[Axes]]:
    # A bare Figure, not pyplot: nothing accumulates in pyplot's global state when plotting in loops or
    # tests, and Jupyter still renders a returned Figure inline.
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.5 * cols, 4.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def pareto_front(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Points not dominated by a cheaper-or-equal, at-least-as-accurate point, sorted by cost: ``(n, 2)``."""
    order = np.lexsort((-np.asarray(accuracy), np.asarray(cost)))  # by cost, best accuracy first on ties
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append((cost[i], accuracy[i]))
            best = accuracy[i]
    return np.array(front, dtype=np.float64).reshape(-1, 2)


def incumbent_accuracy(history: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """After each evaluation, the accuracy of the best-reward policy so far (the search's current answer).

    With the accuracy reward this is the running maximum of accuracy; with another reward it is what the
    search would report, which need not be the most accurate policy it saw.
    """
    out, best_reward, acc = [], -math.inf, math.nan
    for e in history:
        if e["reward"] > best_reward:
            best_reward, acc = e["reward"], e["accuracy"]
        out.append(acc)
    return np.array(out, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ run


def available_agents() -> list[str]:
    """Names of every registered agent, after importing each module of the ``agents`` package.

    Agents register themselves when their module is imported; importing them all here means a grid over
    "every agent" does not depend on what the caller happened to import. A module that fails to import is
    reported with a warning and skipped, so one broken agent does not stop a benchmark of the others.
    """
    import importlib
    import pkgutil
    import warnings

    import agents
    from agents.base import AGENTS

    for info in pkgutil.iter_modules(agents.__path__):
        name = f"agents.{info.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:
            warnings.warn(
                f"could not import {name} ({type(exc).__name__}: {exc}); its agents are not available",
                stacklevel=2,
            )
    return sorted(AGENTS)


def run(
    agents: Sequence[str | Callable[..., None]] | Mapping[str, str | Callable[..., None]] | None = None,
    models: Sequence[ModelArg] | Mapping[str, ModelArg] = ("resnet20",),
    datasets: Sequence[str | Splits] | Mapping[str, str | Splits] = ("digits",),
    targets: Sequence[float] = (0.5,),
    seeds: Sequence[int] = (0,),
    evals: int = 50,
    out: str | os.PathLike = "runs/benchmark",
    reward: str | RewardFn = "acc",
    finetune_epochs: int = 0,
    problem_kwargs: Mapping[str, Any] | None = None,
    agent_settings: Mapping[str, Mapping[str, Any]] | None = None,
    metric: str = "macs",
    progress: bool = True,
) -> BenchmarkResults:
    """Run every agent × seed on every (model, dataset, target) and save tidy results under ``out``.

    Args:
        agents: names in :data:`agents.base.AGENTS`, agent functions, or a ``{label: agent}`` mapping;
            ``None`` runs every agent in :func:`available_agents`.
        models: zoo names, factories or trained ``nn.Module`` s (see :class:`PruningProblem`); use a
            ``{label: model}`` mapping to name non-string models in the results.
        datasets: names for :func:`prune_env.data.load` or :class:`~prune_env.data.Splits`.
        targets: cost budgets as fractions of the base model's ``metric`` ("macs" or "params").
        seeds: one run per agent per seed; the seed is the agent's RNG seed and the fine-tune seed.
            The problem (base model, data split, proxy batches) uses ``problem_kwargs["seed"]`` (default 0)
            for every run, so seeds vary the search, not the problem.
        evals: the evaluation budget of every run.
        reward: a preset name or callable ``Outcome -> float``, the same for every agent.
        finetune_epochs: when > 0, each run's best pruned model is fine-tuned by distillation from the
            base model for this many epochs and scored on the test split (the final report only).
        problem_kwargs: extra :class:`PruningProblem` arguments (``eval_samples``, ``importance``, ...).
        agent_settings: ``{agent label: {setting: value}}`` passed to that agent's function.
        progress: tqdm bar over the grid (and base-model training, if a model is not cached).

    Returns the results of the whole grid, including runs completed by earlier calls with the same
    ``out`` (which are skipped, not repeated). Results depend only on the arguments and seeds.
    """
    # Every argument is checked before a base model is trained or a file written.
    check_settings(
        {"evals": evals, "finetune_epochs": finetune_epochs, "metric": metric, "progress": progress}
    )
    targets = check_sequence("targets", targets, "target")
    seeds = check_sequence("seeds", seeds, "seed")
    get_reward(reward)
    check_problem_kwargs(problem_kwargs or {})
    registered = available_agents()  # also makes names of not-yet-imported agent modules resolvable
    agent_pairs = _labelled(registered if agents is None else agents, "agent")
    from agents.base import resolve_agent

    for _, agent in agent_pairs:
        resolve_agent(agent)
    model_pairs = _labelled(models, "model")
    for _, model in model_pairs:
        check_model_arg(model)
    dataset_pairs = _labelled(datasets, "dataset")
    reward_label = _label(reward, "reward")
    settings = {str(k): dict(v) for k, v in (agent_settings or {}).items()}

    with RunDirectory(out, run_files=(), resume=True, option="out") as rundir:
        return _run_grid(
            rundir,
            agent_pairs,
            model_pairs,
            dataset_pairs,
            targets,
            seeds,
            evals,
            reward,
            reward_label,
            finetune_epochs,
            problem_kwargs,
            settings,
            metric,
            progress,
        )


def check_problem_kwargs(problem_kwargs: Mapping[str, Any]) -> None:
    """Keys must be :class:`PruningProblem` arguments the grid does not set itself; values obey the
    shared rules. (The grid sets the model, the dataset and the target.)"""
    import inspect

    from prune_env.problem import PruningProblem

    accepted = set(inspect.signature(PruningProblem.__init__).parameters) - {
        "self",
        "model",
        "dataset",
        "target_macs",
        "target_params",
    }
    unknown = sorted(set(problem_kwargs) - accepted)
    if unknown:
        raise InvalidSettingError(
            f"problem_kwargs has unknown keys {unknown}; accepted: {', '.join(sorted(accepted))}"
        )
    check_settings(problem_kwargs)


def _run_grid(
    rundir: RunDirectory,
    agent_pairs: list[tuple[str, Any]],
    model_pairs: list[tuple[str, Any]],
    dataset_pairs: list[tuple[str, Any]],
    targets: list[float],
    seeds: list[int],
    evals: int,
    reward: Any,
    reward_label: str,
    finetune_epochs: int,
    problem_kwargs: Mapping[str, Any] | None,
    settings: dict[str, dict[str, Any]],
    metric: str,
    progress: bool,
) -> BenchmarkResults:
    """The grid of :func:`run` in a directory this process holds."""
    from tqdm.auto import tqdm

    out = rundir.path
    runs_csv, evals_csv = out / "runs.csv", out / "evaluations.csv"
    done = BenchmarkResults.load(out)
    for r in done.runs:
        # Mixing budgets or rewards in one directory would make the comparison unequal without saying so.
        if (r["budget_evals"], r["reward"], r["metric"], r["finetune_epochs"]) != (
            evals,
            reward_label,
            metric,
            finetune_epochs,
        ):
            raise InvalidSettingError(
                f"{runs_csv} holds runs with evals={r['budget_evals']}, reward={r['reward']!r}, "
                f"metric={r['metric']!r}, finetune_epochs={r['finetune_epochs']}; this grid asks for "
                f"evals={evals}, reward={reward_label!r}, metric={metric!r}, finetune_epochs={finetune_epochs}. "
                "Use another `out` directory."
            )
    proxy_settings = json.loads(json.dumps(dict(problem_kwargs or {}), default=_json_default))
    saved = out / "runs.json"
    if done.runs and saved.exists():
        before = json.loads(saved.read_text()).get("settings", {}).get("problem_kwargs", proxy_settings)
        if before != proxy_settings:  # another proxy or base model scores differently: not comparable
            raise InvalidSettingError(
                f"{saved} was made with problem_kwargs={before}, this grid asks for {proxy_settings}. "
                "Use another `out` directory."
            )
    if len(done.evaluations) != len(_read_csv(evals_csv)):
        # Drop the rows of a run interrupted before its run row was written: its rerun writes them again.
        # The file as it was is kept aside first.
        rundir.keep_aside(evals_csv.name)
        _write_csv(evals_csv, EVAL_FIELDS, done.evaluations)
    completed = {_run_key(r) for r in done.runs}

    grid = [
        (m, d, t, a, s)
        for m in model_pairs
        for d in dataset_pairs
        for t in targets
        for a in agent_pairs
        for s in seeds
    ]
    todo = [g for g in grid if (g[3][0], g[0][0], g[1][0], g[2], g[4]) not in completed]
    meta = {
        "agents": [a for a, _ in agent_pairs],
        "models": [m for m, _ in model_pairs],
        "datasets": [d for d, _ in dataset_pairs],
        "targets": targets,
        "seeds": seeds,
        "evals": evals,
        "reward": reward_label,
        "metric": metric,
        "finetune_epochs": finetune_epochs,
        "problem_kwargs": proxy_settings,
        "agent_settings": settings,
    }
    results = done
    results.out = out
    problems: dict[tuple[str, str, float], PruningProblem] = {}
    with tqdm(total=len(grid), initial=len(grid) - len(todo), desc="benchmark", disable=not progress) as bar:
        for (m_label, model), (d_label, dataset), target, (a_label, agent), seed in todo:
            bar.set_postfix_str(f"{a_label} {m_label}/{d_label} t={target:g} seed={seed}")
            pkey = (m_label, d_label, target)
            if pkey not in problems:
                problems.clear()  # one problem alive at a time: they hold a model, data and a memo
                problems[pkey] = _problem(model, dataset, target, metric, problem_kwargs, progress)
            problem = problems[pkey]
            run_row, eval_rows = _one_run(
                problem, agent, seed, evals, reward, settings.get(a_label, {}), finetune_epochs
            )
            keys = {"agent": a_label, "model": m_label, "dataset": d_label, "target": target, "seed": seed}
            run_row = {**keys, "metric": metric, "reward": reward_label, **run_row}
            eval_rows = [{**keys, **e} for e in eval_rows]
            # Evaluations first, then the run row: a run counts as done only once all its rows are on disk.
            _append_csv(evals_csv, EVAL_FIELDS, eval_rows)
            _append_csv(runs_csv, RUN_FIELDS, [run_row])
            results.runs.append(run_row)
            results.evaluations.extend(eval_rows)
            _write_json(out / "runs.json", {"settings": meta, "runs": [_jsonable(r) for r in results.runs]})
            bar.update(1)
    if not todo and not (out / "runs.json").exists():
        _write_json(out / "runs.json", {"settings": meta, "runs": [_jsonable(r) for r in results.runs]})
    # Report the requested grid in grid order, even if the directory holds more (an earlier, larger grid).
    wanted = {(a[0], m[0], d[0], t, s) for m, d, t, a, s in grid}
    results.runs = [r for r in results.runs if _run_key(r) in wanted]
    results.evaluations = [e for e in results.evaluations if _run_key(e) in wanted]
    return results


def _problem(
    model: Any,
    dataset: Any,
    target: float,
    metric: str,
    problem_kwargs: Mapping[str, Any] | None,
    progress: bool,
) -> PruningProblem:
    from prune_env.problem import PruningProblem

    kwargs = {"progress": progress, **dict(problem_kwargs or {})}
    kwargs["target_params" if metric == "params" else "target_macs"] = target
    return PruningProblem(model, dataset, **kwargs)


def _one_run(
    problem: PruningProblem,
    agent: Any,
    seed: int,
    evals: int,
    reward: Any,
    settings: Mapping[str, Any],
    finetune_epochs: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from agents.base import BudgetedEvaluator, run_agent

    start = time.perf_counter()
    result = run_agent(agent, BudgetedEvaluator(problem, evals, reward), seed, **settings)
    best = result.best_outcome
    val_acc = test_acc = math.nan
    if finetune_epochs > 0:
        from prune_env.train import finetune

        # Identical recipe for every run (only the seed differs): differences come from the policies.
        _, metrics = finetune(
            problem.build(result.best_keep),
            problem.base_model,
            problem.splits,
            finetune_epochs,
            seed=seed,
            progress=False,
            device=problem.device,
        )
        val_acc, test_acc = float(metrics["val_accuracy"]), float(metrics["test_accuracy"])
    row = {
        "budget_evals": evals,
        "evals_used": len(result.history),
        "best_reward": float(result.best_reward),
        "best_accuracy": float(best.accuracy),
        "macs_ratio": float(best.macs_ratio),
        "params_ratio": float(best.params_ratio),
        "base_accuracy": float(problem.base_accuracy),
        "finetune_epochs": finetune_epochs,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "seconds": time.perf_counter() - start,
        "ratios": " ".join(f"{r:.4f}" for r in np.asarray(best.ratios).reshape(-1)),
        "keep": " ".join(str(int(k)) for k in best.keep),
    }
    return row, [e.as_row() for e in result.history]
