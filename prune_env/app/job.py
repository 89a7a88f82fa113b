"""The main job behind ``prune-env search``: base model, search, KD fine-tune, and everything written to disk.

A run directory (see :mod:`prune_env.app.runfiles` for its files) belongs to one process for the whole run
(an OS lock, see :mod:`prune_env.app.rundir`); a directory holding any run file is refused unless the run
is resumed.

Resume: the run's settings must match the state file's, and every logged row is checked against the
problem (kept counts, costs within the target, the reward the reward function gives). The agent then
starts again from the beginning with the same seed while the evaluator answers its first proposals from
the log instead of the proxy (:meth:`agents.evaluator.BudgetedEvaluator.replay`): the agent retraces its
own history, reaching the state (policy network, population, RNG) it had when interrupted, so a resumed
search ends exactly as the uninterrupted one would. A run whose search is complete resumes straight into
the fine-tune.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.evaluator import BudgetedEvaluator, Evaluation
from agents.registry import AgentSpec, available, check_budget_range, resolve_agent, run_agent
from prune_env.app.final_latency import guarded_keep, latency_fields
from prune_env.app.rundir import RunDirectory
from prune_env.app.runfiles import (
    EVALUATIONS_FILE,
    RUN_FILES,
    STATE_FILE,
    STATE_FORMAT,
    RunLog,
    cost_ratios,
    plot_allocation,
    plot_search,
    read_evaluations,
    read_state,
    setup_logging,
    write_json,
)
from prune_env.app.settings import DEFAULT_AGENTS, SearchSettings
from prune_env.app.weights import base_model_spec, load_weights
from prune_env.data import Splits, load
from prune_env.device import resolve_device
from prune_env.errors import ResumeError, UnknownNameError, UnsupportedLayerError
from prune_env.fileio import write_text_atomic
from prune_env.problem import PruningProblem
from prune_env.rewards import get_reward
from prune_env.scoring import PolicyScorer

log = logging.getLogger("prune_env.job")


def default_agent() -> str:
    """The first of :data:`DEFAULT_AGENTS` that can run here."""
    names = available()
    name = next((a for a in DEFAULT_AGENTS if a in names), None)
    if name is None:
        raise UnknownNameError(f"none of the default agents {DEFAULT_AGENTS} can run here; pass --agent")
    return name


def run_directory(s: SearchSettings) -> RunDirectory:
    return RunDirectory(s.out, run_files=RUN_FILES, resume=s.resume, state_file=STATE_FILE, option="--out")


def preflight(s: SearchSettings) -> tuple[SearchSettings, Splits]:
    """Check everything before anything slow happens; returns the settings with the agent named, and the
    loaded dataset splits.

    Builds the untrained architecture's graph (a fraction of a second) so an impossible target is
    reported before the base model is trained, not after.
    """
    from prune_env.graph import build_graph
    from prune_env.latency.budget import settings_projector
    from prune_env.models import get_model

    p = s.problem
    run_directory(s).check()
    resolve_device(p.device)
    get_reward(s.reward)
    spec = resolve_agent(s.agent or default_agent())
    spec.make_settings(s.agent_settings)
    check_budget_range(spec, s.budget_range, p.target, p.metric)
    splits = load(s.dataset, seed=p.seed, image_size=s.image_size)
    with torch.random.fork_rng(devices=[]):
        net = get_model(s.model, splits.num_classes, splits.in_channels).eval()
    if s.weights is not None:
        load_weights(net, s.weights)  # a file that does not fit is refused before any work
    graph = build_graph(net, splits.example_inputs(1))
    if not graph.groups:
        raise UnsupportedLayerError(f"{s.model} has no prunable channel group")
    # A latency table depends on the structure alone: measured here once, the trained model's is a cache hit.
    projector = settings_projector(p, net, splits.example_inputs(1), graph, resolve_device(p.device))
    projector.check_target(p.target)
    return dataclasses.replace(s, agent=spec.name), splits


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


POLICY_DIR = "policy"  # a budget-range run's policy (agents.policies: policy.json and its weights)


def _open_run(s: SearchSettings, rundir: RunDirectory) -> tuple[dict[str, Any], list[Evaluation]]:
    """The run's state and its logged evaluations: fresh, or those of the run being resumed.

    A resumed run must have been made with the same settings (every key of
    :meth:`SearchSettings.identity`, none missing), and its log must agree with its state file; a log
    whose last line a hard kill cut short is kept aside and rewritten without that line.
    """
    identity = s.identity()
    if not s.resume:
        return {"format": STATE_FORMAT, "settings": identity, "budget_evals": s.evals, "evals_done": 0}, []
    state_path = s.out / STATE_FILE
    state = read_state(state_path)
    saved = state["settings"]
    missing = [k for k in identity if k not in saved]
    if missing:
        raise ResumeError(f"cannot resume {s.out}: {state_path} does not record {', '.join(missing)}")
    differ = [k for k in identity if saved[k] != identity[k]]
    if differ:
        what = ", ".join(f"{k}={saved[k]!r} (now {identity[k]!r})" for k in differ)
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
        write_text_atomic(csv_path, logged.complete_text)
        log.warning("the last line of %s was cut short (kept as %s); it is run again", csv_path, aside)
    state["budget_evals"] = s.evals
    return state, logged.records


def _resume_hint(s: SearchSettings) -> str:
    argv = list(s.argv)
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["prune-env", *argv])


def _agent_settings(spec: AgentSpec, s: SearchSettings) -> dict[str, Any]:
    """The user's agent settings, plus the run's defaults for those the agent has: a TensorBoard
    directory inside the run, and no progress bar of its own (the job's bar counts evaluations)."""
    names = {f.name for f in dataclasses.fields(spec.settings)}
    settings = dict(s.agent_settings)
    if "tensorboard_log" in names:
        settings.setdefault("tensorboard_log", str(s.out / "tensorboard"))
    if "progress" in names:
        settings.setdefault("progress", False)
    return settings


def _results(
    s: SearchSettings,
    problem: PruningProblem,
    evaluator: BudgetedEvaluator,
    timings: dict[str, float],
    status: str,
    finetuned: dict[str, float] | None,
    final: np.ndarray | None = None,
    *,
    policy_applied: bool = False,
) -> dict[str, Any]:
    """The run's results; ``final``: the kept counts of the saved model when they are not the best
    evaluation's (never scored by the proxy), which replace them -- those a budget-range run's policy chose
    for the target (``policy_applied``), or those the latency guard re-projected the choice to."""
    from prune_env.app.provenance import git_revision, hardware
    from prune_env.checkpoint import versions

    assert evaluator.best is not None, "results are written only once a policy was evaluated"
    reward, outcome = evaluator.best
    proxy_accuracy: float | None = outcome.accuracy
    if final is not None:
        outcome = problem.outcome(final, accuracy=float("nan"), loss=float("nan"))
        proxy_accuracy = None
    names = problem.group_names
    tuned = finetuned is not None and s.finetune_epochs > 0  # with 0 epochs, finetune() only scored it
    return {
        "status": status,
        "agent": s.agent,
        "seed": s.problem.seed,
        "model": s.model,
        "dataset": s.dataset,
        "metric": s.problem.metric,
        "target": s.problem.target,
        "reward_preset": s.reward,
        "budget_evals": s.evals,
        "evals_done": evaluator.used,
        "best_evaluation": int(np.argmax([e.reward for e in evaluator.history])),
        "best_reward": reward,
        "ratios": dict(zip(names, (float(r) for r in outcome.ratios), strict=True)),
        "keep": dict(zip(names, (int(k) for k in outcome.keep), strict=True)),
        "uniform_keep": dict(zip(names, (int(k) for k in problem.uniform_keep()), strict=True)),
        "channels": dict(zip(names, (int(c) for c in problem.units), strict=True)),
        "macs": int(outcome.macs),
        "params": int(outcome.params),
        "base_macs": int(outcome.base_macs),
        "base_params": int(outcome.base_params),
        "macs_ratio": outcome.macs_ratio,
        "params_ratio": outcome.params_ratio,
        **outcome.latency_fields(),
        "proxy_accuracy": proxy_accuracy,
        "policy_applied": policy_applied,
        "base_proxy_accuracy": problem.base_accuracy,
        "base_test_accuracy": problem.base_metrics.get("test_accuracy"),
        "finetune_epochs": s.finetune_epochs if finetuned is not None else None,
        "finetuned": tuned,
        "finetuned_val_accuracy": finetuned["val_accuracy"] if tuned and finetuned is not None else None,
        "test_accuracy": None if finetuned is None else finetuned["test_accuracy"],
        "settings": s.identity(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "git_revision": git_revision(),
        "hardware": hardware(),
        "command": shlex.join(["prune-env", *s.argv]),
    }


def _save_model(
    s: SearchSettings, problem: PruningProblem, keep: np.ndarray, model: nn.Module, meta: dict[str, Any]
) -> Path:
    from prune_env.checkpoint import kept_units, save_pruned

    return save_pruned(
        s.out / "model",
        model,
        keep=kept_units(problem.rankings, keep, problem.group_names),
        input_shape=problem.data.input_shape,
        architecture=s.model,
        num_classes=problem.data.num_classes,
        in_channels=problem.data.in_channels,
        meta={
            "dataset": s.dataset,
            "seed": s.problem.seed,
            "metric": s.problem.metric,
            "target": s.problem.target,
            **meta,
        },
    )


def _plot_allocation(s: SearchSettings, problem: PruningProblem, keep: np.ndarray) -> None:
    plot_allocation(
        problem.group_names, problem.units, keep, problem.uniform_keep(), s.out / "allocation.png"
    )


def _finish_partial(
    s: SearchSettings,
    problem: PruningProblem,
    evaluator: BudgetedEvaluator | None,
    timings: dict[str, float],
    started: float,
    where: str,
) -> int:
    """Ctrl-C: keep what exists (log, best policy, its un-fine-tuned model, plot) and say how to resume."""
    timings["total_seconds"] = time.perf_counter() - started
    # While a resumed agent still retraces its log, the files of the earlier interruption are the newer.
    if evaluator is not None and evaluator.best is not None and not evaluator.replaying:
        results = _results(s, problem, evaluator, timings, "interrupted", None)
        write_json(s.out / "results.json", results)
        plot_search(
            evaluator.history, s.out / "search.png", problem.target, problem.metric, problem.projector
        )
        keep = np.asarray(evaluator.best[1].keep, dtype=np.int64)
        _plot_allocation(s, problem, keep)
        _save_model(s, problem, keep, problem.scored_model(keep), {"finetuned": False})
    done = 0 if evaluator is None else evaluator.used
    if s.budget_range is not None:
        log.warning(
            "interrupted during %s after %d/%d evaluations; what exists is saved in %s (a --budget-range run "
            "cannot be resumed: start it again with another --out)", where, done, s.evals, s.out,
        )  # fmt: skip
        return 130
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
    s, splits = preflight(s)
    with run_directory(s) as rundir:
        return _run_owned(s, splits, rundir)


def _run_owned(s: SearchSettings, splits: Splits, rundir: RunDirectory) -> int:
    """The search job in a run directory this process holds."""
    job = _SearchJob(s, splits, rundir)
    try:
        job.prepare()
        job.search()
        job.finish()
        return 0
    except KeyboardInterrupt:
        return job.interrupted()
    finally:
        job.close()


class _SearchJob:
    """One search job's steps -- prepare the problem, search, fine-tune and save -- and what an interruption
    keeps. ``stage`` says which step is running (an interruption reports it)."""

    def __init__(self, s: SearchSettings, splits: Splits, rundir: RunDirectory) -> None:
        self.s = s
        self.splits = splits
        self.rundir = rundir
        self.started = time.perf_counter()
        self.spec = resolve_agent(s.agent or default_agent())
        self.handlers = setup_logging(s.out)
        self.timings: dict[str, float] = {}
        self.problem: PruningProblem | None = None
        self.evaluator: BudgetedEvaluator | None = None
        self.scorer: PolicyScorer | None = None
        self.run_log: RunLog | None = None
        self.bar: Any = None
        self.stage = "base model"
        self.state: dict[str, Any] = {}
        self.previous: list[Evaluation] = []
        self.policy: Any = None

    def prepare(self) -> None:
        """The run's state, the problem (base model trained or loaded), the scorer and the evaluator."""
        s = self.s
        self.state, self.previous = _open_run(s, self.rundir)
        t0 = time.perf_counter()
        problem = self.problem = PruningProblem(base_model_spec(s, self.splits), self.splits, s.problem)
        if s.weights is not None:  # trained elsewhere: its test accuracy, for the report only
            from prune_env.train import evaluate

            problem.base_metrics["test_accuracy"] = evaluate(
                problem.base_model, self.splits.test, device=problem.device
            )["accuracy"]
        self.timings["base_seconds"] = time.perf_counter() - t0
        self.run_log = RunLog(s.out, self.state)
        if s.parallel:
            from prune_env.distributed import RayScorer

            self.scorer = RayScorer(problem, s.workers, address=s.ray_address)
            log.info("scoring on %d Ray workers", self.scorer.workers)
        self.evaluator = BudgetedEvaluator(
            problem,
            s.evals,
            reward=s.reward,
            on_evaluation=self.run_log,
            budget_range=s.budget_range,
            scorer=self.scorer,
        )
        # A resumed log is checked against the problem before anything is said or written.
        self.evaluator.check_log(self.previous, str(self.run_log.csv_path))
        log.info("prune-env search: %s on %s, %s target %g, agent %s, %d evaluations, seed %d", s.model,
                 s.dataset, problem.metric, problem.target, self.spec.name, s.evals, problem.seed)  # fmt: skip
        log.info(
            "base model: %d groups, %s MACs, %s params, proxy accuracy %.4f, test accuracy %s",
            problem.n_groups,
            f"{problem.graph.base_macs:,}",
            f"{problem.graph.base_params:,}",
            problem.base_accuracy,
            _fmt(problem.base_metrics.get("test_accuracy")),
        )

    def search(self) -> None:
        """The agent's search within the evaluation budget, resumed from the run's log where there is one."""
        from tqdm.auto import tqdm

        s, problem, evaluator, run_log = self.s, self.problem, self.evaluator, self.run_log
        assert problem is not None and evaluator is not None and run_log is not None  # prepared
        self.stage = "search"
        previous = self.previous
        self.bar = run_log.bar = tqdm(
            total=s.evals,
            desc=f"search ({s.agent})",
            unit="eval",
            disable=not s.problem.progress,
            leave=False,
        )
        run_log.start(previous)
        self.state["evals_done"] = len(previous)
        write_json(s.out / STATE_FILE, self.state)
        if len(previous) == s.evals:
            evaluator.preload(previous)  # the search was complete: straight to the fine-tune
        elif previous:
            evaluator.replay(previous)
        if previous:
            self.bar.update(len(previous))
            log.info("resumed: %d evaluations replayed from %s", len(previous), run_log.csv_path)
        t0 = time.perf_counter()
        if evaluator.remaining > 0:
            # The same seed as the interrupted run: the agent retraces the logged evaluations, then goes on.
            settings = _agent_settings(self.spec, s)
            self.policy = run_agent(self.spec.name, evaluator, seed=problem.seed, **settings).policy
        self.timings["search_seconds"] = time.perf_counter() - t0
        self.bar.close()
        if evaluator.best is None:
            raise RuntimeError(f"agent {self.spec.name!r} finished without evaluating any policy")
        best_reward, outcome = evaluator.best
        log.info(
            "search done: %d evaluations, best reward %.4f, proxy accuracy %.4f at %s ratio %.3f",
            evaluator.used,
            best_reward,
            outcome.accuracy,
            problem.metric,
            outcome.cost_ratio,
        )

    def finish(self) -> None:
        """The best policy (or a budget-range policy applied at the target) fine-tuned, measured under a
        latency budget, saved with the results and plots."""
        from prune_env.train import finetune

        s, problem, evaluator = self.s, self.problem, self.evaluator
        assert problem is not None and evaluator is not None and evaluator.best is not None  # searched
        keep = np.asarray(evaluator.best[1].keep, dtype=np.int64)
        applied = None
        if s.budget_range is not None and self.policy is not None:
            # The learned policy, not one episode of it, is what a budget-range run is for: saved with the
            # run (`prune-env apply` uses it for other targets) and applied to this run's target.
            self.policy.save(s.out / POLICY_DIR)
            keep = applied = self.policy.keep_for(problem, problem.target)
            log.info("policy saved to %s; applied at %s target %g", s.out / POLICY_DIR, problem.metric,
                     problem.target)  # fmt: skip
        # Before the fine-tune: a policy the machine runs slower than the table said (latency_guard) is
        # replaced by the same policy projected onto a lower predicted budget, and that one is fine-tuned.
        self.stage = "latency guard"
        chosen = keep
        keep, fit = guarded_keep(problem, chosen)
        final = keep if fit is not None and fit.steps else applied
        self.stage = "fine-tune"
        t0 = time.perf_counter()
        # Fine-tuning starts from the model as the proxy scored it (BatchNorm recalibrated): with zero
        # epochs that is what is saved, never the pruned model with the base model's stale statistics.
        tuned, metrics = finetune(
            problem.scored_model(keep),
            problem.base_model,
            problem.data,
            s.finetune_epochs,
            seed=problem.seed,
            progress=s.problem.progress,
            device=problem.device,
        )
        self.timings["finetune_seconds"] = time.perf_counter() - t0
        self.timings["total_seconds"] = time.perf_counter() - self.started
        results = _results(
            s,
            problem,
            evaluator,
            self.timings,
            "finished",
            metrics,
            final,
            policy_applied=applied is not None,
        )
        if problem.metric == "latency":
            self.stage = "latency check"
            results.update(latency_fields(problem, keep, tuned, fit))
            if fit is not None and fit.steps:  # the search's choice, which the guard replaced
                results["searched_keep"] = dict(zip(problem.group_names, map(int, chosen), strict=True))
        finetuned = s.finetune_epochs > 0  # with 0 epochs finetune() only scores the model
        _save_model(
            s, problem, keep, tuned, {"finetuned": finetuned, "test_accuracy": metrics["test_accuracy"]}
        )
        write_json(s.out / "results.json", results)
        # Finished only once the model and results are on disk: a run stopped before (a full disk) resumes.
        self.state["status"] = "finished"
        write_json(s.out / STATE_FILE, self.state)
        plot_search(
            evaluator.history, s.out / "search.png", problem.target, problem.metric, problem.projector
        )
        _plot_allocation(s, problem, keep)
        # The saved model's costs: for a budget-range run the policy applied at the target, whose costs
        # differ from the best episode's.
        saved = problem.outcome(keep, accuracy=float("nan"), loss=float("nan"))
        log.info(
            "%s: test accuracy %.4f (base %s); %s; saved to %s in %.0f s",
            f"fine-tuned {s.finetune_epochs} epochs" if finetuned else "not fine-tuned (--finetune-epochs 0)",
            metrics["test_accuracy"],
            _fmt(problem.base_metrics.get("test_accuracy")),
            cost_ratios(problem.metric, saved.cost_ratio, saved.params_ratio),
            s.out,
            self.timings["total_seconds"],
        )

    def interrupted(self) -> int:
        """Ctrl-C: keep what exists and say how to resume (exit status 130)."""
        if self.bar is not None:
            self.bar.close()
        if self.problem is None:
            log.warning("interrupted while preparing the base model; nothing to save yet")
            return 130
        return _finish_partial(self.s, self.problem, self.evaluator, self.timings, self.started, self.stage)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        if self.run_log is not None:
            self.run_log.close()
        for h in self.handlers:
            log.removeHandler(h)
            h.close()


__all__ = ["POLICY_DIR", "base_model_spec", "default_agent", "preflight", "run_search"]
