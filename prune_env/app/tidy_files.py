"""The tidy files of a benchmark grid, row by row: the columns of ``runs.csv`` and ``evaluations.csv``,
rows read back with their numbers restored, rows appended (a kill loses at most the row being written),
files replaced atomically, and JSON written with what it holds made plain."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prune_env.errors import ResumeError
from prune_env.fileio import reporting_full_disk, write_atomic
from prune_env.serialize import json_default

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
    # Latency budgets only (blank otherwise): the best policy's predicted latency ratio, then its model and
    # the base model measured by the table's protocol (prune_env.latency.budget.LatencyCheck).
    "latency_ratio",
    "latency_predicted_ms",
    "latency_measured_ms",
    "latency_measured_iqr_ms",
    "latency_measured_repeats",
    "latency_measured_noisy",  # 1: a measurement stayed above the protocol's noise bound
    "base_latency_measured_ms",
    "latency_prediction_error",  # (predicted - measured) / measured
    "measured_speedup",  # base / pruned, measured
    "revision",  # of the code that made the run (provenance.revision); blank in files made before it
    # Columns added later stand after it (a file written before gains them, blank: append_csv).
    "latency_measured_rounds",  # pairs measured; the median round's fields are above
    # The latency guard (prune_env.latency.guard), when the problem has latency_guard=True: re-projections,
    # whether the final model measured within the target, why it stopped, the predicted budgets projected
    # onto and each measured ratio, and the search's own choice when the guard replaced it (keep above).
    "latency_guard_steps",
    "latency_guard_within",
    "latency_guard_stopped",
    "latency_guard_budgets",
    "latency_guard_measured_ratios",
    "searched_keep",
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
_INT_FIELDS = {
    "seed",
    "budget_evals",
    "evals_used",
    "finetune_epochs",
    "index",
    "latency_measured_repeats",
    "latency_measured_noisy",
    "latency_measured_rounds",
    "latency_guard_steps",
    "latency_guard_within",
}
_STR_FIELDS = {
    "agent",
    "model",
    "dataset",
    "metric",
    "reward",
    "ratios",
    "keep",
    "revision",
    "latency_guard_stopped",
    "latency_guard_budgets",
    "latency_guard_measured_ratios",
    "searched_keep",
}
# In evaluations.csv "reward" is each evaluation's reward (a number); in runs.csv it names the reward function.
EVAL_STR_FIELDS = _STR_FIELDS - {"reward"}
RunKey = tuple[str, str, str, float, int]


def run_key(row: Mapping[str, Any]) -> RunKey:
    # Normalised types: rows read back from CSV carry strings, fresh rows carry numbers.
    return (str(row["agent"]), str(row["model"]), str(row["dataset"]), float(row["target"]), int(row["seed"]))


def parse_row(row: Mapping[str, str], strings: Collection[str] = _STR_FIELDS) -> dict[str, Any]:
    """A CSV row with its numbers restored (blank numeric cells become NaN); ``strings``: its text columns."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in strings:
            out[k] = v
        elif k in _INT_FIELDS:
            out[k] = int(v) if v != "" else None
        else:
            try:
                out[k] = float(v) if v != "" else math.nan
            except ValueError:  # an unknown textual column (a user's extra field): keep it as text
                out[k] = v
    return out


def read_csv(path: Path, strings: Collection[str] = _STR_FIELDS) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [parse_row(r, strings) for r in csv.DictReader(f)]


def _cell(v: Any) -> Any:
    # Blank instead of "nan": the tidy convention for "not measured", and pandas reads it back as NaN.
    return "" if isinstance(v, float) and math.isnan(v) else v


def _write_rows(f: Any, fields: Sequence[str], rows: Iterable[Mapping[str, Any]], *, header: bool) -> None:
    writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
    if header:
        writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k, "")) for k in fields})


def append_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Append ``rows`` under the header ``fields``. A file written with fewer columns (by an earlier
    version) first gains the new ones, blank in its rows (rewritten atomically, no cell changed); one with
    columns ``fields`` lacks is refused: appended rows would sit under the wrong names."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _widen_header(path, fields)
    with reporting_full_disk(path, None), path.open("a", newline="") as f:
        _write_rows(f, fields, rows, header=new)
        f.flush()
        os.fsync(f.fileno())  # the point of appending per run: survive a kill right after it


def _widen_header(path: Path, fields: Sequence[str]) -> None:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if header == list(fields):
            return
        unknown = [c for c in header if c not in fields]
        if unknown:
            raise ResumeError(
                f"{path} has columns this version does not write ({', '.join(unknown[:5])}): it was written by "
                "another version of prune_env; append to it with that version, or use another directory"
            )
        old_rows = list(reader)
    write_atomic(path, lambda f: _write_rows(f, fields, old_rows, header=True))


def write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` atomically: a kill mid-write leaves the old file, never a half-written one."""

    write_atomic(path, lambda f: _write_rows(f, fields, rows, header=True))


def write_json(path: Path, obj: Any) -> None:
    """Atomic replace: a reader (or a resumed grid) never sees half a file."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=1, default=json_value, allow_nan=False))


def json_value(v: Any) -> Any:
    try:
        return json_default(v)
    except TypeError:
        return str(v)  # settings may hold objects (a custom proxy): record their description


def jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


__all__ = [
    "EVAL_FIELDS",
    "RUN_FIELDS",
    "RUN_KEYS",
    "RunKey",
    "append_csv",
    "json_value",
    "jsonable",
    "parse_row",
    "read_csv",
    "run_key",
    "write_csv",
    "write_json",
]
