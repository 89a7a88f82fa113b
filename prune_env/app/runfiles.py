"""The files of a search run and how they are read back: the evaluation log, the state, the plot.

A run directory holds:

- ``evaluations.csv``: one row per evaluation, appended and flushed as it happens (the source of truth
  for ``--resume``);
- ``state.json``: the run's settings and how many evaluations are done;
- ``results.json``: the best policy, its costs, proxy accuracy, the saved model's test accuracy (and
  ``finetuned``: whether it was fine-tuned, with its validation accuracy if so), timings and versions;
- ``model/``: the pruned (fine-tuned) model, reloadable with :func:`prune_env.load_pruned`;
- ``policy/``: a ``--budget-range`` run's learned policy (``policy.json`` and its weights), and
  ``applied/``: the models ``prune-env apply`` made with it for other targets;
- ``tensorboard/``: every evaluation's reward, proxy accuracy, loss, cost ratios and best reward so far
  (``search/...`` scalars, any agent), beside the SB3 learners' own logs;
- ``search.png``: the search curve; ``allocation.png``: the best policy's kept fraction per group beside
  uniform pruning's; ``log.txt``: the log.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from agents.evaluator import Evaluation
from agents.tensorboard import EvaluationWriter
from prune_env.errors import ResumeError
from prune_env.fileio import DISK_FULL_ERRNOS, append_text, write_bytes_atomic, write_text_atomic
from prune_env.serialize import json_default, loads_strict

if TYPE_CHECKING:
    from prune_env.budget import BudgetProjector

STATE_FORMAT = 2  # 2: the settings record every field of the problem's settings
STATE_FILE = "state.json"
EVALUATIONS_FILE = "evaluations.csv"
# Everything a run writes: a directory holding any of these is a run (resumable or not), never reused.
RUN_FILES = (
    STATE_FILE,
    EVALUATIONS_FILE,
    "results.json",
    "model",
    "search.png",
    "allocation.png",
    "log.txt",
    "tensorboard",
    "policy",  # a --budget-range run's learned policy
    "applied",  # models `prune-env apply` made from it
)

log = logging.getLogger("prune_env.job")


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def cost_ratios(metric: str, cost_ratio: float, params_ratio: float) -> str:
    """``"macs ratio 0.498, params ratio 0.612"``; the params ratio once when it is the constrained cost."""
    if metric == "params":
        return f"params ratio {params_ratio:.3f}"
    return f"{metric} ratio {cost_ratio:.3f}, params ratio {params_ratio:.3f}"


def _csv_line(row: dict[str, Any] | None) -> str:
    """One line of ``evaluations.csv``: the header (``row=None``) or a row."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=Evaluation.columns())
    if row is None:
        writer.writeheader()
    else:
        writer.writerow(row)
    return buffer.getvalue()


def save_figure(figure: Any, path: Path) -> None:
    """A matplotlib figure as a PNG, written as every other file is (atomically, a full disk reported)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())


class EvaluationLog(NamedTuple):
    """``evaluations.csv`` as read: its rows, and its complete lines when a hard kill cut the last short."""

    records: list[Evaluation]
    complete_text: str | None  # None: the file ends with a complete line (or does not exist)


def read_evaluations(path: Path) -> EvaluationLog:
    """The rows of ``evaluations.csv`` as :class:`~agents.evaluator.Evaluation` records.

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
    columns = Evaluation.columns()
    if not complete or next(csv.reader(complete[:1])) != columns:
        raise ResumeError(
            f"{path}: the first line is not the header {','.join(columns)}; restore the file or start a "
            "new run with another --out"
        )
    records = []
    for number, row in enumerate(csv.reader(complete[1:]), start=2):
        try:
            if len(row) != len(columns):
                raise ValueError(f"{len(row)} fields, expected {len(columns)}")
            records.append(Evaluation.from_row(dict(zip(columns, row, strict=True))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ResumeError(
                f"{path}, line {number}: not an evaluation row ({exc}); the file is left as it is: restore "
                "it or start a new run with another --out"
            ) from None
    return EvaluationLog(records, None if len(complete) == len(lines) else "".join(complete))


def read_state(path: Path) -> dict[str, Any]:
    """``state.json``, parsed strictly (a key given twice, NaN or Infinity refused: a hand edit hides a
    second value behind the first), checked for its format, its settings and its evaluation count."""
    try:
        state = loads_strict(path.read_bytes())
    except OSError as exc:
        raise ResumeError(f"cannot read {path} ({exc.strerror}); restore it or start a new run") from None
    except UnicodeDecodeError:
        raise ResumeError(
            f"{path} is not readable JSON (not UTF-8 text); restore it or start a new run"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ResumeError(
            f"{path} is not readable JSON ({' '.join(str(exc).split())}); restore it or start a new run"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(
            f"{path} is not a prune-env run state of format {STATE_FORMAT} (made by another version?); "
            "start a new run with another --out"
        )
    settings = state.get("settings")
    if not isinstance(settings, dict) or not isinstance(state.get("evals_done"), int):
        raise ResumeError(f"{path} lacks the run's settings or its evaluation count")
    if "importance" in settings:
        # Resolved only once the base model is ready: an edited name must name this file, and early.
        from prune_env.importance import importance_names

        names = importance_names()
        if settings["importance"] not in names:
            raise ResumeError(
                f"{path}: in its settings, importance {settings['importance']!r} is not one of "
                f"{', '.join(names)}; the file is damaged or was edited: restore it, or start a new run"
            )
    return state


class RunLog:
    """The evaluator's ``on_evaluation`` callback: CSV row, state file and progress bar, per evaluation."""

    def __init__(self, directory: Path, state: dict[str, Any], bar: Any = None) -> None:
        self.directory = directory
        self.state = state
        self.bar = bar  # a tqdm bar, set once the search starts
        self.csv_path = directory / EVALUATIONS_FILE
        self.best = -float("inf")
        self.tensorboard: EvaluationWriter | None = None  # opened by start()

    def start(self, records: Sequence[Evaluation]) -> None:
        """Write the header of a new log; a resumed log already has it, and its rows stay as they are."""
        if not self.csv_path.exists():
            write_text_atomic(self.csv_path, _csv_line(None))
        self.best = max((r.reward for r in records), default=-float("inf"))
        # Every agent's evaluations as TensorBoard scalars (a resumed run adds an event file beside the
        # earlier one, which holds the evaluations before the interruption).
        self.tensorboard = EvaluationWriter(self.directory / "tensorboard", best=self.best)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __call__(self, entry: Evaluation) -> None:
        append_text(self.csv_path, _csv_line(entry.as_row()))
        self.state["evals_done"] = entry.index + 1
        write_json(self.directory / STATE_FILE, self.state)
        self.best = max(self.best, entry.reward)
        if self.tensorboard is not None:
            self.tensorboard(entry)
        log.debug(
            "eval %d: reward %.4f acc %.4f macs %.3f params %.3f",
            entry.index,
            entry.reward,
            entry.accuracy,
            entry.macs_ratio,
            entry.params_ratio,
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{self.best:.4f}", acc=f"{entry.accuracy:.3f}", refresh=False)


def plot_search(
    history: Sequence[Evaluation],
    path: Path,
    target: float,
    metric: str,
    projector: BudgetProjector | None = None,
) -> None:
    """Best-so-far reward and each evaluation's proxy accuracy; below, each evaluation's cost ratio (a
    latency's from ``projector``, the problem's: a predicted latency is not logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.arange(len(history))
    reward = np.array([e.reward for e in history])
    acc = np.array([e.accuracy for e in history])
    if metric == "latency" and projector is not None:
        cost = np.array([projector.cost_ratio(np.asarray(e.keep, dtype=np.int64)) for e in history])
    else:
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
    save_figure(fig, path)
    plt.close(fig)


def plot_allocation(
    names: Sequence[str], units: ArrayLike, keep: ArrayLike, uniform: ArrayLike, path: Path
) -> None:
    """The picture pruning papers show: per group, in network order, the fraction of channels the best
    policy keeps beside what uniform pruning to the same target keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = np.asarray(units, dtype=np.float64)
    found = np.asarray(keep, dtype=np.float64) / total
    even = np.asarray(uniform, dtype=np.float64) / total
    x = np.arange(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    ax.bar(x - width / 2, found, width, label="best policy")
    ax.bar(x + width / 2, even, width, color="tab:gray", alpha=0.6, label="uniform, same target")
    ax.set_xticks(x, [n if len(n) <= 28 else "…" + n[-27:] for n in names], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of channels kept")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


class _LogFile(logging.FileHandler):
    """``log.txt``. A full disk is said once, by the run's own files (:mod:`prune_env.fileio`); the log's
    lines are not worth a logging traceback each."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return
        super().handleError(record)


def setup_logging(directory: Path) -> list[logging.Handler]:
    log.setLevel(logging.DEBUG)
    log.propagate = False
    file_handler = _LogFile(directory / "log.txt")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    for h in (file_handler, console):
        log.addHandler(h)
    return [file_handler, console]


__all__ = [
    "EVALUATIONS_FILE",
    "RUN_FILES",
    "STATE_FILE",
    "STATE_FORMAT",
    "EvaluationLog",
    "RunLog",
    "cost_ratios",
    "plot_allocation",
    "plot_search",
    "read_evaluations",
    "read_state",
    "setup_logging",
    "write_json",
]
