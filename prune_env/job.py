"""The main job behind ``prune-env search``: base model, search, KD fine-tune, and everything written to disk.

A run directory holds:

- ``evaluations.csv``: one row per evaluation, flushed as it happens (the source of truth for ``--resume``);
- ``state.json``: the run's settings and how many evaluations are done;
- ``results.json``: the best policy, its costs, proxy and fine-tuned test accuracy, timings and versions;
- ``model/``: the pruned (fine-tuned) model, reloadable with :func:`prune_env.load_pruned`;
- ``search.png``: the search curve; ``log.txt``: the log; ``tensorboard/``: SB3 agents' logs.

A run directory belongs to one process for the whole run (an OS lock, see :mod:`prune_env.rundir`); a
directory holding any run file is refused unless the run is resumed.

Resume: the run's settings must match the state file's, and every logged row is checked against the
problem (kept counts, costs within the target, the reward the reward function gives). The agent then
starts again from the beginning with the same seed while the evaluator answers its first proposals from
the log instead of the proxy (:meth:`agents.base.BudgetedEvaluator.replay`): the agent retraces its own
history, reaching the state (policy network, population, RNG) it had when interrupted, so a resumed search
ends exactly as the uninterrupted one would. A run whose search is complete resumes straight into the
fine-tune.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import logging
import pkgutil
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from prune_env.device import resolve_device
from prune_env.errors import PruneEnvError, ResumeError, RunDirectoryError, UnknownNameError
from prune_env.rundir import RunDirectory, write_atomic
from prune_env.serialize import json_default
from prune_env.validation import check_settings, fraction

STATE_FORMAT = 1
STATE_FILE = "state.json"
EVALUATIONS_FILE = "evaluations.csv"
# Everything a run writes: a directory holding any of these is a run (resumable or not), never reused.
RUN_FILES = (STATE_FILE, EVALUATIONS_FILE, "results.json", "model", "search.png", "log.txt", "tensorboard")
# The first one registered is the default: evolution spends its budget near the target at a fraction of
# an SB3 learner's overhead per evaluation, so the README's default run stays within minutes on 2 cores.
DEFAULT_AGENTS = ("evolution", "ppo", "random")
# Settings a resumed run must share with the run it continues (the budget and fine-tune may change).
RESUME_KEYS = (
    "model", "dataset", "seed", "metric", "target", "reward", "eval_samples", "max_ratio", "fill_budget", "agent"
)  # fmt: skip

log = logging.getLogger("prune_env.job")


def out_path(text: str) -> Path:
    """The ``--out`` option as a path; an empty one would become ``Path(".")``, a directory the user
    did not name."""
    if not text.strip():
        raise RunDirectoryError("--out is empty; name the run directory, e.g. --out runs/my-run")
    return Path(text)


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

    check_settings(
        {
            "evals": s.evals,
            "finetune_epochs": s.finetune_epochs,
            "eval_samples": s.eval_samples,
            "metric": s.metric,
            "max_ratio": s.max_ratio,
            "seed": s.seed,
            "fill_budget": s.fill_budget,
            "resume": s.resume,
            "progress": s.progress,
        },
        option_style=True,
    )
    fraction(f"--target-{s.metric}", s.target)
    run_directory(s).check()
    resolve_device(s.device)
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
    write_atomic(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def _columns() -> list[str]:
    from agents.base import Evaluation

    return [f.name for f in fields(Evaluation)]


def run_directory(s: SearchSettings) -> RunDirectory:
    return RunDirectory(s.out, run_files=RUN_FILES, resume=s.resume, state_file=STATE_FILE, option="--out")


def _parse_row(row: Sequence[str], columns: Sequence[str]) -> Any:
    from agents.base import Evaluation

    if len(row) != len(columns):
        raise ValueError(f"{len(row)} fields, expected {len(columns)}")
    cell = dict(zip(columns, row, strict=True))
    return Evaluation(
        index=int(cell["index"]),
        reward=float(cell["reward"]),
        accuracy=float(cell["accuracy"]),
        loss=float(cell["loss"]),
        macs_ratio=float(cell["macs_ratio"]),
        params_ratio=float(cell["params_ratio"]),
        seconds=float(cell["seconds"]),
        ratios=tuple(float(r) for r in cell["ratios"].split()),
        keep=tuple(int(k) for k in cell["keep"].split()),
    )


class EvaluationLog(NamedTuple):
    """``evaluations.csv`` as read: its rows, and its complete lines when a hard kill cut the last short."""

    records: list[Any]
    complete_text: str | None  # None: the file ends with a complete line (or does not exist)


def read_evaluations(path: Path) -> EvaluationLog:
    """The rows of ``evaluations.csv`` as :class:`~agents.base.Evaluation` records.

    Every row is written with its line end in one call, so a hard kill can cut only the last line short:
    a last line without a line end is left out (the caller keeps the file aside before rewriting it). Any
    other line that does not parse raises :class:`ResumeError` naming the file and the line; the file is
    left as it is.
    """
    if not path.is_file():
        return EvaluationLog([], None)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    complete = [line for line in lines if line.endswith(("\n", "\r"))]
    if len(complete) < len(lines) - 1:
        raise ResumeError(f"{path}: a line ends without a line break before the last line")
    columns = _columns()
    if not complete or next(csv.reader(complete[:1])) != columns:
        raise ResumeError(
            f"{path}: the first line is not the header {','.join(columns)}; restore the file or start a "
            "new run with another --out"
        )
    records = []
    for number, row in enumerate(csv.reader(complete[1:]), start=2):
        try:
            records.append(_parse_row(row, columns))
        except (KeyError, TypeError, ValueError) as exc:
            raise ResumeError(
                f"{path}, line {number}: not an evaluation row ({exc}); the file is left as it is: restore "
                "it or start a new run with another --out"
            ) from None
    return EvaluationLog(records, None if len(complete) == len(lines) else "".join(complete))


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path} is not readable JSON ({exc}); restore it or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{path} is not a prune-env run state of format {STATE_FORMAT}")
    if not isinstance(state.get("settings"), dict) or not isinstance(state.get("evals_done"), int):
        raise ResumeError(f"{path} lacks the run's settings or its evaluation count")
    return state


class RunLog:
    """The evaluator's ``on_evaluation`` callback: CSV row, state file and progress bar, per evaluation."""

    def __init__(self, directory: Path, state: dict[str, Any], bar: Any = None) -> None:
        self.directory = directory
        self.state = state
        self.bar = bar  # a tqdm bar, set once the search starts
        self.csv_path = directory / EVALUATIONS_FILE
        self.best = -float("inf")

    def start(self, records: Sequence[Any]) -> None:
        """Write the header of a new log; a resumed log already has it, and its rows stay as they are."""
        if not self.csv_path.exists():
            with self.csv_path.open("w", newline="") as fh:
                csv.DictWriter(fh, fieldnames=_columns()).writeheader()
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


def _open_run(s: SearchSettings, rundir: RunDirectory) -> tuple[dict[str, Any], list[Any]]:
    """The run's state and its logged evaluations: fresh, or those of the run being resumed.

    A resumed run must have been made with the same settings (every one of :data:`RESUME_KEYS`, none
    missing), and its log must agree with its state file; a log whose last line a hard kill cut short is
    kept aside and rewritten without that line.
    """
    if not s.resume:
        state = {"format": STATE_FORMAT, "settings": s.identity(), "budget_evals": s.evals, "evals_done": 0}
        return state, []
    state_path = s.out / STATE_FILE
    state = _read_state(state_path)
    saved = state["settings"]
    now = s.identity()
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise ResumeError(f"cannot resume {s.out}: {state_path} does not record {', '.join(missing)}")
    differ = [k for k in RESUME_KEYS if saved[k] != now[k]]
    if differ:
        what = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in differ)
        raise ResumeError(f"cannot resume {s.out}: it was run with {what}")
    csv_path = s.out / EVALUATIONS_FILE
    logged = read_evaluations(csv_path)
    done, recorded = len(logged.records), state["evals_done"]
    # Each row is appended before the state is updated, so the log holds the recorded count or one more.
    if not recorded <= done <= recorded + 1:
        raise ResumeError(
            f"{csv_path} holds {done} evaluations but {state_path} records {recorded}; the files do not "
            "belong together: restore them or start a new run with another --out"
        )
    if s.evals < done:
        raise ResumeError(f"--evals {s.evals} is less than the {done} evaluations already done")
    if logged.complete_text is not None:
        aside = rundir.keep_aside(EVALUATIONS_FILE)
        write_atomic(csv_path, logged.complete_text)
        log.warning("the last line of %s was cut short (kept as %s); it is run again", csv_path, aside)
    state["budget_evals"] = s.evals
    return state, logged.records


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
    # While a resumed agent still retraces its log, the files of the earlier interruption are the newer.
    if evaluator is not None and evaluator.best is not None and not evaluator.replaying:
        results = _results(s, problem, evaluator, timings, "interrupted", None)
        _write_json(s.out / "results.json", results)
        plot_search(evaluator.history, s.out / "search.png", s.target, s.metric)
        keep = np.asarray(evaluator.best[1].keep, dtype=np.int64)
        _save_model(s, problem, keep, problem.scored_model(keep), {"finetuned": False})
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
    splits = preflight(s)
    with run_directory(s) as rundir:
        return _run_owned(s, splits, rundir)


def _run_owned(s: SearchSettings, splits: Any, rundir: RunDirectory) -> int:
    """The search job in a run directory this process holds."""
    from tqdm.auto import tqdm

    from agents.base import BudgetedEvaluator, run_agent
    from prune_env.problem import PruningProblem
    from prune_env.train import finetune

    started = time.perf_counter()
    _, agent_fn = resolve_agent(s.agent)
    handlers = _setup_logging(s.out)
    timings: dict[str, float] = {}
    problem = evaluator = None
    bar = None
    stage = "base model"
    try:
        state, previous = _open_run(s, rundir)
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
        run_log = RunLog(s.out, state)
        evaluator = BudgetedEvaluator(problem, s.evals, reward=s.reward, on_evaluation=run_log)
        # A resumed log is checked against the problem before anything is said or written.
        evaluator.check_log(previous, str(run_log.csv_path))
        log.info("prune-env search: %s on %s, %s target %g, agent %s, %d evaluations, seed %d", s.model,
                 s.dataset, s.metric, s.target, s.agent, s.evals, s.seed)  # fmt: skip
        log.info(
            "base model: %d groups, %s MACs, %s params, proxy accuracy %.4f, test accuracy %s",
            problem.n_groups,
            f"{problem.graph.base_macs:,}",
            f"{problem.graph.base_params:,}",
            problem.base_accuracy,
            _fmt(problem.base_metrics.get("test_accuracy")),
        )

        stage = "search"
        bar = run_log.bar = tqdm(
            total=s.evals, desc=f"search ({s.agent})", unit="eval", disable=not s.progress, leave=False
        )
        run_log.start(previous)
        state["evals_done"] = len(previous)
        _write_json(s.out / STATE_FILE, state)
        if len(previous) == s.evals:
            evaluator.preload(previous)  # the search was complete: straight to the fine-tune
        elif previous:
            evaluator.replay(previous)
        if previous:
            bar.update(len(previous))
            log.info("resumed: %d evaluations replayed from %s", len(previous), run_log.csv_path)
        t0 = time.perf_counter()
        if evaluator.remaining > 0:
            # The same seed as the interrupted run: the agent retraces the logged evaluations, then goes on.
            run_agent(agent_fn, evaluator, seed=s.seed, **_agent_settings(agent_fn, s))
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
        # Fine-tuning starts from the model as the proxy scored it (BatchNorm recalibrated): with zero
        # epochs that is what is saved, never the pruned model with the base model's stale statistics.
        tuned, metrics = finetune(
            problem.scored_model(keep),
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
        _write_json(s.out / STATE_FILE, state)
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
