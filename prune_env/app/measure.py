"""What the benchmark scripts share: timing a call over repeats, and writing a results file that records
where it came from.

The scripts under ``benchmarks/`` import this as any other module of the application layer, so one timing
loop and one results writer serve them all; the library never imports it.

A results file is a JSON object; :func:`write_results` adds to it the key ``"provenance"``: one record per
invocation that wrote the file (revision, time, command, library versions, hardware; see
:func:`prune_env.app.provenance.invocation_record`), so a file that a resumed run extended says every
revision whose rows it holds. Files written before this writer have no such key and read as before.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any

from prune_env.app.provenance import invocation_record, plain
from prune_env.errors import InvalidSettingError
from prune_env.fileio import write_text_atomic

PROVENANCE = "provenance"  # the key of a results file's list of invocation records


@dataclasses.dataclass(frozen=True)
class RepeatTimes:
    """Wall-clock seconds of each timed repeat of one call, in the order they ran."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median repeat: what a noisy machine's occasional slow repeat moves least."""
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how far the repeats disagree (0 for a zero median)."""
        centre = self.median
        return (max(self.seconds) - min(self.seconds)) / centre if centre > 0 else 0.0


def time_repeats(
    run: Callable[[], object],
    repeats: int,
    *,
    warmup: int = 0,
    before_each: Callable[[], object] | None = None,
) -> RepeatTimes:
    """Call ``run`` ``warmup`` times untimed (first-call allocations, kernel selection), then ``repeats``
    times, each timed alone with :func:`time.perf_counter`. ``before_each`` runs untimed before every timed
    call: a fresh copy of what a repeat would otherwise find already done."""
    if repeats < 1 or warmup < 0:
        raise InvalidSettingError(
            f"repeats must be at least 1 and warmup at least 0, got {repeats}, {warmup}"
        )
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        start = perf_counter()
        run()
        times.append(perf_counter() - start)
    return RepeatTimes(tuple(times))


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: a timing's record of how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()]


@functools.cache
def this_invocation() -> dict[str, Any]:
    """This process's provenance record, made once (its time is that of the first write), as plain JSON so
    that it compares equal to itself read back from a file."""
    record: dict[str, Any] = plain(invocation_record())
    return record


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """``value`` as indented JSON at ``path``, in one step: serialised first, so a value that cannot be
    written leaves the file that was there as it was, then written beside it and renamed over it."""
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def write_results(path: str | os.PathLike[str], results: Mapping[str, Any]) -> None:
    """Write the results object ``results`` to ``path`` (as :func:`write_json`) with its provenance.

    ``results["provenance"]``, if there, is the list read from an earlier version of the file: it is kept,
    and this process's record added once, however often the process rewrites the file. A script that
    extends a file it loaded passes it back whole; one that starts a file afresh passes none.
    """
    earlier = list(results.get(PROVENANCE) or [])
    record = this_invocation()
    write_json(path, {**results, PROVENANCE: earlier if record in earlier else [*earlier, record]})


__all__ = [
    "PROVENANCE",
    "RepeatTimes",
    "load_average",
    "this_invocation",
    "time_repeats",
    "write_json",
    "write_results",
]
