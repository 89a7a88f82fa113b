"""The main job behind ``prune-env search``: base model, search, KD fine-tune, and everything written to disk.

A run directory holds:

- ``evaluations.csv``: one row per evaluation, flushed as it happens (the source of truth for ``--resume``);
- ``state.json``: the run's settings and how many evaluations are done;
- ``results.json``: the best policy, its costs, proxy and fine-tuned test accuracy, timings and versions;
- ``model/``: the pruned (fine-tuned) model, reloadable with :func:`prune_env.load_pruned`;
- ``search.png``: the search curve; ``log.txt``: the log; ``tensorboard/``: SB3 agents' logs.

Resume: the logged evaluations are replayed into the evaluator (they count against ``--evals`` and compete
for the best policy, without being re-scored), and the agent is started again for the remaining budget with
seed ``seed + evaluations done``. The history and the budget carry over; an agent's internal state (a
policy network, a population) does not — it restarts, seeded differently so it does not repeat the
evaluations it already spent. A run whose search is complete resumes straight into the fine-tune.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import logging
import os
import pkgutil
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prune_env.errors import PruneEnvError, UnknownNameError
from prune_env.serialize import json_default

STATE_FORMAT = 1
# The first one registered is the default: evolution spends its budget near the target at a fraction of
# an SB3 learner's overhead per evaluation, so the README's default run stays within minutes on 2 cores.
DEFAULT_AGENTS = ("evolution", "ppo", "random")
# Settings a resumed run must share with the run it continues (the budget and fine-tune may change).
RESUME_KEYS = (
    "model", "dataset", "seed", "metric", "target", "reward", "eval_samples", "max_ratio", "fill_budget", "agent"
)  # fmt: skip

log = logging.getLogger("prune_env.job")


@dataclass
class SearchSettings:
    """Everything ``prune-env search`` was asked to do."""

    out: Path
    model: str = "resnet20"
    dataset: str = "digits"
    metric: str = "macs"
    target: float = 0.5
    agent: str | None = None
    evals: int = 100
    seed: int = 0
    reward: str = "acc"
    eval_samples: int = 1000
    max_ratio: float = 0.8
    fill_budget: bool = False
    finetune_epochs: int = 3
    resume: bool = False
    progress: bool = True
    device: str | None = None
    argv: list[str] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RESUME_KEYS}


# ------------------------------------------------------------------------------------------------ agents

_AGENT_IMPORT_ERRORS: dict[str, str] = {}


def agent_registry() -> dict[str, Callable[..., None]]:
    """Every registered agent: imports each module of the ``agents`` package so all of them register."""
    import agents
    from agents.base import AGENTS

    for info in pkgutil.iter_modules(agents.__path__):
        try:
            importlib.import_module(f"agents.{info.name}")
        except Exception as exc:  # an agent with a missing optional dependency must not break the others
            _AGENT_IMPORT_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
    return AGENTS


def resolve_agent(name: str | None) -> tuple[str, Callable[..., None]]:
    registry = agent_registry()
    if name is None:
        name = next((a for a in DEFAULT_AGENTS if a in registry), None)
        if name is None:
            raise UnknownNameError(f"none of the default agents {DEFAULT_AGENTS} is registered; pass --agent")
    if name not in registry:
        hint = ""
        if _AGENT_IMPORT_ERRORS:
            failed = "; ".join(f"agents.{m}: {e}" for m, e in sorted(_AGENT_IMPORT_ERRORS.items()))
            hint = f" (modules that failed to import: {failed})"
        raise UnknownNameError(f"unknown agent {name!r}; available: {', '.join(sorted(registry))}{hint}")
    return name, registry[name]


# ------------------------------------------------------------------------------------------------ checks


def preflight(s: SearchSettings) -> Any:
    """Check every argument before anything slow happens; returns the loaded dataset splits.

    Builds the untrained architecture's graph (a fraction of a second) so an impossible target is
    reported before the base model is trained, not after.
    """
    from prune_env.data import load
    from prune_env.graph import build_graph
    from prune_env.models import get_model
    from prune_env.rewards import get_reward
    from prune_env.spaces import BudgetProjector

    if s.evals < 1:
        raise PruneEnvError(f"--evals must be at least 1, got {s.evals}")
    if s.finetune_epochs < 0:
        raise PruneEnvError(f"--finetune-epochs must be >= 0, got {s.finetune_epochs}")
    if s.eval_samples < 1:
        raise PruneEnvError(f"--eval-samples must be at least 1, got {s.eval_samples}")
    if not 0.0 < s.target <= 1.0:
        raise PruneEnvError(
            f"--target-{s.metric} must be a fraction of the base model's {s.metric} in (0, 1]"
        )
    if not 0.0 < s.max_ratio <= 1.0:
        raise PruneEnvError(f"--max-ratio must lie in (0, 1], got {s.max_ratio}")
    if s.device is not None:
        try:
            torch.device(s.device)
        except RuntimeError:
            raise PruneEnvError(f"unknown device {s.device!r}; use e.g. 'cpu' or 'cuda:0'") from None
    get_reward(s.reward)
    splits = load(s.dataset, seed=s.seed)
    with torch.random.fork_rng(devices=[]):
        net = get_model(s.model, splits.num_classes, splits.in_channels).eval()
    graph = build_graph(net, splits.example_inputs(1))
    if not graph.groups:
        raise PruneEnvError(f"{s.model} has no prunable channel group")
    projector = BudgetProjector(
        graph.costs, [g.channels for g in graph.groups], metric=s.metric, max_ratio=s.max_ratio
    )
    projector.check_target(s.target)
    # Last: importing every agent module (Stable-Baselines3 among them) is the slowest check.
    s.agent, _ = resolve_agent(s.agent)
    return splits


# ------------------------------------------------------------------------------------------------ run files


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=json_default) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write never leaves half a file


def _columns() -> list[str]:
    from agents.base import Evaluation

    return [f.name for f in fields(Evaluation)]


def read_evaluations(path: Path) -> list[Any]:
    """Complete rows of ``evaluations.csv`` as :class:`~agents.base.Evaluation` records.

    A row cut short by a hard kill is dropped (it is re-run), so the log never needs repairing by hand.
    """
    from agents.base import Evaluation

    if not path.is_file():
        return []
    records = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                records.append(
                    Evaluation(
                        index=int(row["index"]),
                        reward=float(row["reward"]),
                        accuracy=float(row["accuracy"]),
                        loss=float(row["loss"]),
                        macs_ratio=float(row["macs_ratio"]),
                        params_ratio=float(row["params_ratio"]),
                        seconds=float(row["seconds"]),
                        ratios=tuple(float(r) for r in row["ratios"].split()),
                        keep=tuple(int(k) for k in row["keep"].split()),
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                break  # a truncated last line
    return records


class RunLog:
    """The evaluator's ``on_evaluation`` callback: CSV row, state file and progress bar, per evaluation."""

    def __init__(self, directory: Path, state: dict[str, Any], bar: Any) -> None:
        self.directory = directory
        self.state = state
        self.bar = bar
        self.csv_path = directory / "evaluations.csv"
        self.best = -float("inf")

    def rewrite(self, records: Sequence[Any]) -> None:
        """Start the CSV afresh with ``records`` (drops a truncated tail left by a hard kill)."""
        with self.csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=_columns())
            writer.writeheader()
            for rec in records:
                writer.writerow(rec.as_row())
        self.best = max((r.reward for r in records), default=-float("inf"))

    def record(self, entry: Any) -> None:
        with self.csv_path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=_columns()).writerow(entry.as_row())
            fh.flush()
        self.state["evals_done"] = entry.index + 1
        _write_json(self.directory / "state.json", self.state)
        self.best = max(self.best, entry.reward)
        log.debug(
            "eval %d: reward %.4f acc %.4f macs %.3f params %.3f",
            entry.index,
            entry.reward,
            entry.accuracy,
            entry.macs_ratio,
            entry.params_ratio,
        )
        self.bar.update(1)
        self.bar.set_postfix(best=f"{self.best:.4f}", acc=f"{entry.accuracy:.3f}", refresh=False)

    def __call__(self, entry: Any) -> None:
        self.record(entry)


def plot_search(history: Sequence[Any], path: Path, target: float, metric: str) -> None:
    """Best-so-far reward and each evaluation's proxy accuracy; below, each evaluation's cost ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.arange(len(history))
    reward = np.array([e.reward for e in history])
    acc = np.array([e.accuracy for e in history])
    cost = np.array([e.macs_ratio if metric == "macs" else e.params_ratio for e in history])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(idx, np.maximum.accumulate(reward) if len(reward) else reward, label="best reward so far")
    top.scatter(idx, acc, s=8, alpha=0.5, color="tab:orange", label="proxy accuracy")
    top.set_ylabel("reward / accuracy")
    top.legend(loc="lower right")
    bottom.scatter(idx, cost, s=8, alpha=0.6)
    bottom.axhline(target, color="tab:red", linestyle="--", label=f"target {target:g}")
    bottom.set_ylabel(f"{metric} ratio")
    bottom.set_xlabel("evaluation")
    bottom.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the job


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _setup_logging(directory: Path) -> list[logging.Handler]:
    log.setLevel(logging.DEBUG)
    log.propagate = False
    file_handler = logging.FileHandler(directory / "log.txt")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    for h in (file_handler, console):
        log.addHandler(h)
    return [file_handler, console]


def _open_run(s: SearchSettings) -> dict[str, Any]:
    """The run's state: fresh, or the one being resumed (checked against the current settings)."""
    state_path = s.out / "state.json"
    if s.resume:
        if not state_path.is_file():
            raise PruneEnvError(f"nothing to resume: {s.out} holds no state.json")
        state = json.loads(state_path.read_text())
        saved = state.get("settings", {})
        differ = [k for k in RESUME_KEYS if k in saved and saved[k] != s.identity()[k]]
        if differ:
            what = ", ".join(f"{k}={saved[k]!r} (now {s.identity()[k]!r})" for k in differ)
            raise PruneEnvError(f"cannot resume {s.out}: it was run with {what}")
        done = len(read_evaluations(s.out / "evaluations.csv"))
        if s.evals < done:
            raise PruneEnvError(f"--evals {s.evals} is less than the {done} evaluations already done")
        state["budget_evals"] = s.evals
        return state
    if state_path.exists():
        raise PruneEnvError(
            f"{s.out} already holds a run; add --resume to continue it or choose another --out"
        )
    return {"format": STATE_FORMAT, "settings": s.identity(), "budget_evals": s.evals, "evals_done": 0}


def _resume_hint(s: SearchSettings) -> str:
    argv = list(s.argv)
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["prune-env", *argv])


def _agent_settings(fn: Callable[..., None], s: SearchSettings) -> dict[str, Any]:
    """Optional keyword settings an agent accepts (SB3 agents take a TensorBoard directory)."""
    params = inspect.signature(fn).parameters
    settings: dict[str, Any] = {}
    # SB3 agents take it through **settings, so their module says it, not their signature.
    if "tensorboard_log" in params or getattr(fn, "__module__", "") == "agents.sb3":
        settings["tensorboard_log"] = str(s.out / "tensorboard")
    if "progress" in params:
        settings["progress"] = False  # the job's own bar already counts evaluations
    return settings


def _results(
    s: SearchSettings,
    problem: Any,
    evaluator: Any,
    timings: dict[str, float],
    status: str,
    finetuned: dict[str, float] | None,
) -> dict[str, Any]:
    from prune_env.checkpoint import versions

    reward, outcome = evaluator.best
    names = problem.group_names
    return {
        "status": status,
        "agent": s.agent,
        "seed": s.seed,
        "model": s.model,
        "dataset": s.dataset,
        "metric": s.metric,
        "target": s.target,
        "reward_preset": s.reward,
        "budget_evals": s.evals,
        "evals_done": evaluator.used,
        "best_evaluation": int(np.argmax([e.reward for e in evaluator.history])),
        "best_reward": reward,
        "ratios": dict(zip(names, (float(r) for r in outcome.ratios), strict=True)),
        "keep": dict(zip(names, (int(k) for k in outcome.keep), strict=True)),
        "channels": dict(zip(names, (int(c) for c in problem.channels), strict=True)),
        "macs": int(outcome.macs),
        "params": int(outcome.params),
        "base_macs": int(outcome.base_macs),
        "base_params": int(outcome.base_params),
        "macs_ratio": outcome.macs_ratio,
        "params_ratio": outcome.params_ratio,
        "proxy_accuracy": outcome.accuracy,
        "base_proxy_accuracy": problem.base_accuracy,
        "base_test_accuracy": problem.base_metrics.get("test_accuracy"),
        "finetune_epochs": s.finetune_epochs if finetuned is not None else None,
        "finetuned_val_accuracy": None if finetuned is None else finetuned["val_accuracy"],
        "test_accuracy": None if finetuned is None else finetuned["test_accuracy"],
        "eval_samples": s.eval_samples,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "command": shlex.join(["prune-env", *s.argv]),
    }


def _save_model(s: SearchSettings, problem: Any, keep: np.ndarray, model: Any, meta: dict[str, Any]) -> Path:
    from prune_env.checkpoint import kept_units, save_pruned

    return save_pruned(
        s.out / "model",
        model,
        keep=kept_units(problem.rankings, keep, problem.group_names),
        input_shape=problem.splits.input_shape,
        architecture=s.model,
        num_classes=problem.splits.num_classes,
        in_channels=problem.splits.in_channels,
        meta={"dataset": s.dataset, "seed": s.seed, "metric": s.metric, "target": s.target, **meta},
    )


def _finish_partial(
    s: SearchSettings,
    problem: Any,
    evaluator: Any,
    timings: dict[str, float],
    started: float,
    where: str,
) -> int:
    """Ctrl-C: keep what exists (log, best policy, its un-fine-tuned model, plot) and say how to resume."""
    timings["total_seconds"] = time.perf_counter() - started
    if evaluator is not None and evaluator.best is not None:
        results = _results(s, problem, evaluator, timings, "interrupted", None)
        _write_json(s.out / "results.json", results)
        plot_search(evaluator.history, s.out / "search.png", s.target, s.metric)
        keep = np.asarray(evaluator.best[1].keep, dtype=np.int64)
        _save_model(s, problem, keep, problem.build(keep), {"finetuned": False})
    done = 0 if evaluator is None else evaluator.used
    log.warning(
        "interrupted during %s after %d/%d evaluations; what exists is saved in %s. Continue with:\n  %s",
        where,
        done,
        s.evals,
        s.out,
        _resume_hint(s),
    )
    return 130


def run_search(s: SearchSettings) -> int:
    """``prune-env search``; returns the exit status (0 done, 130 interrupted)."""
    from tqdm.auto import tqdm

    from agents.base import BudgetedEvaluator, run_agent
    from prune_env.problem import PruningProblem
    from prune_env.train import finetune

    started = time.perf_counter()
    splits = preflight(s)
    _, agent_fn = resolve_agent(s.agent)
    state = _open_run(s)
    s.out.mkdir(parents=True, exist_ok=True)
    handlers = _setup_logging(s.out)
    timings: dict[str, float] = {}
    problem = evaluator = None
    bar = None
    stage = "base model"
    try:
        log.info("prune-env search: %s on %s, %s target %g, agent %s, %d evaluations, seed %d", s.model,
                 s.dataset, s.metric, s.target, s.agent, s.evals, s.seed)  # fmt: skip
        t0 = time.perf_counter()
        problem = PruningProblem(
            s.model,
            splits,
            target_macs=s.target if s.metric == "macs" else None,
            target_params=s.target if s.metric == "params" else None,
            max_ratio=s.max_ratio,
            fill_budget=s.fill_budget,
            eval_samples=s.eval_samples,
            seed=s.seed,
            device=s.device,
            progress=s.progress,
        )
        timings["base_seconds"] = time.perf_counter() - t0
        log.info(
            "base model: %d groups, %s MACs, %s params, proxy accuracy %.4f, test accuracy %s",
            problem.n_groups,
            f"{problem.graph.base_macs:,}",
            f"{problem.graph.base_params:,}",
            problem.base_accuracy,
            _fmt(problem.base_metrics.get("test_accuracy")),
        )

        stage = "search"
        bar = tqdm(
            total=s.evals, desc=f"search ({s.agent})", unit="eval", disable=not s.progress, leave=False
        )
        run_log = RunLog(s.out, state, bar)
        evaluator = BudgetedEvaluator(problem, s.evals, reward=s.reward, on_evaluation=run_log)
        previous = read_evaluations(run_log.csv_path) if s.resume else []
        run_log.rewrite(previous)
        if previous:
            evaluator.preload(previous)
            bar.update(len(previous))
            log.info("resumed: %d evaluations replayed from %s", len(previous), run_log.csv_path)
        state["evals_done"] = evaluator.used
        _write_json(s.out / "state.json", state)
        t0 = time.perf_counter()
        if evaluator.remaining > 0:
            # A fresh seed per restart, so a resumed agent does not re-propose what it already spent.
            run_agent(agent_fn, evaluator, seed=s.seed + evaluator.used, **_agent_settings(agent_fn, s))
        timings["search_seconds"] = time.perf_counter() - t0
        bar.close()
        if evaluator.best is None:
            raise PruneEnvError(f"agent {s.agent!r} finished without evaluating any policy")
        best_reward, outcome = evaluator.best
        log.info(
            "search done: %d evaluations, best reward %.4f, proxy accuracy %.4f at %s ratio %.3f",
            evaluator.used,
            best_reward,
            outcome.accuracy,
            s.metric,
            outcome.cost_ratio,
        )

        stage = "fine-tune"
        keep = np.asarray(outcome.keep, dtype=np.int64)
        t0 = time.perf_counter()
        tuned, metrics = finetune(
            problem.build(keep),
            problem.base_model,
            problem.splits,
            s.finetune_epochs,
            seed=s.seed,
            progress=s.progress,
            device=s.device,
        )
        timings["finetune_seconds"] = time.perf_counter() - t0
        timings["total_seconds"] = time.perf_counter() - started
        state["status"] = "finished"
        _write_json(s.out / "state.json", state)
        results = _results(s, problem, evaluator, timings, "finished", metrics)
        _save_model(s, problem, keep, tuned, {"finetuned": True, "test_accuracy": metrics["test_accuracy"]})
        _write_json(s.out / "results.json", results)
        plot_search(evaluator.history, s.out / "search.png", s.target, s.metric)
        log.info(
            "fine-tuned %d epochs: test accuracy %.4f (base %s); %s ratio %.3f, params ratio %.3f; "
            "saved to %s in %.0f s",
            s.finetune_epochs,
            metrics["test_accuracy"],
            _fmt(problem.base_metrics.get("test_accuracy")),
            s.metric,
            outcome.cost_ratio,
            outcome.params_ratio,
            s.out,
            timings["total_seconds"],
        )
        return 0
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if problem is None:
            log.warning("interrupted while preparing the base model; nothing to save yet")
            return 130
        return _finish_partial(s, problem, evaluator, timings, started, stage)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


__all__ = ["SearchSettings", "agent_registry", "read_evaluations", "resolve_agent", "run_search"]
