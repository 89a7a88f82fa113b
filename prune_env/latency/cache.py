"""Latency tables on disk: JSON files (never pickle) in the package's cache directory, written atomically.

A cached table is keyed by everything that decides its numbers -- the model's structure hash, the input
shape, the batch, the device and its name, the thread count, the torch version and the table format --
under ``<cache>/latency/``, where ``<cache>`` is :func:`prune_env.cache.cache_dir` (``$PRUNE_ENV_CACHE`` or
``~/.cache/prune_env``), beside the cached base models. A file there that cannot be read as a table
(truncated, edited into invalid JSON, of an older format) is measured anew with a warning, never used; a
valid table measured for other settings is refused with a :class:`LatencyTableError` naming the difference.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from prune_env.cache import cache_dir, cache_key
from prune_env.errors import LatencyTableError
from prune_env.fileio import write_text_atomic
from prune_env.latency.codec import table_from_json, table_to_json
from prune_env.latency.table import LatencyTable, TableMeta, check_compatible
from prune_env.serialize import loads_strict

TABLE_DIR = "latency"


def table_path(meta: TableMeta, root: str | os.PathLike[str] | None = None) -> Path:
    """Where the table for ``meta`` is cached: ``<cache>/latency/<model>-<key>.json``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", meta.model or "model").strip("-") or "model"
    return cache_dir(root) / TABLE_DIR / f"{name}-{_key(meta)}.json"


def _key(meta: TableMeta) -> str:
    return cache_key(meta.key_fields())[:20]


def read_table(path: str | os.PathLike[str]) -> LatencyTable:
    """The table in the JSON file ``path``, parsed strictly; :class:`LatencyTableError` naming the file
    when it is missing, unreadable, not JSON, or not a complete table."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise LatencyTableError(f"cannot read the latency table {path}: {exc.strerror or exc}") from None
    try:
        data = loads_strict(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LatencyTableError(f"{path} is not valid JSON ({exc}); measure the table again") from None
    try:
        return table_from_json(data)
    except LatencyTableError as exc:
        raise LatencyTableError(f"{path}: {exc}") from None


def load_table(path: str | os.PathLike[str], expected: TableMeta | None = None) -> LatencyTable:
    """:func:`read_table`, then, given ``expected``, refuse a table measured for anything else
    (another model, input shape, batch, device, thread count or torch version), naming each difference."""
    table = read_table(path)
    if expected is not None:
        check_compatible(table.meta, expected, str(path))
    return table


def save_table(table: LatencyTable, path: str | os.PathLike[str]) -> None:
    """Write ``table`` as JSON at ``path`` in one step (a reader sees the old file or the new, never half)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, table_to_json(table))


def _cached_candidates(meta: TableMeta, path: Path) -> list[Path]:
    """The files that may hold ``meta``'s table, cached at ``path``: that file first, then any other file
    under the same key. The key (the structure hash and the settings), not the name, decides what a table is
    for: a table measured as ``vgg11_quarter-<key>.json`` by ``prune-env latency`` serves a problem that
    knows the model only as a module (``model-<key>``) -- otherwise it would be measured a second time,
    perhaps while the machine is busy, and the two runs priced by different tables."""
    others = sorted(p for p in path.parent.glob(f"*-{_key(meta)}.json") if p != path)
    return [path, *others]


def cached_table(
    expected: TableMeta,
    measure: Callable[[], LatencyTable],
    root: str | os.PathLike[str] | None = None,
    *,
    refresh: bool = False,
) -> tuple[LatencyTable, Path, bool]:
    """The cached table for ``expected``, else ``measure()`` saved to the cache.

    Returns the table, its file and whether it came from the cache. ``refresh``: measure anew whatever is
    cached. A cached file that is not a readable table is passed over with a warning (and replaced when it
    is at ``expected``'s own path); a readable table for other settings under the key (edited or copied
    there) is a :class:`LatencyTableError`. A table measured while the machine was busy
    (:attr:`LatencyTable.disturbed`) is used with a warning each time, naming how to measure it again.
    """
    path = table_path(expected, root)
    for candidate in [] if refresh else _cached_candidates(expected, path):
        if not candidate.exists():
            continue
        try:
            table = read_table(candidate)
        except LatencyTableError as exc:
            warnings.warn(
                f"ignoring an unusable cached latency table ({exc}); measuring it again", stacklevel=3
            )
            continue
        check_compatible(table.meta, expected, str(candidate))
        _warn_if_disturbed(table, candidate)
        return table, candidate, True
    table = measure()
    save_table(table, path)
    _warn_if_disturbed(table, path)
    return table, path, False


def _warn_if_disturbed(table: LatencyTable, path: Path) -> None:
    if table.disturbed:
        warnings.warn(
            f"the latency table {path} was measured while other work shared the cores: the unpruned model's "
            f"repeated medians moved {table.noise:.0%} (the protocol's bound is "
            f"{float(table.protocol['noise_bound']):.0%}), so its predictions carry that load; measure it "
            "again with nothing else running (delete the file, or pass refresh=True / --refresh)",
            stacklevel=4,
        )


__all__ = ["TABLE_DIR", "cached_table", "load_table", "read_table", "save_table", "table_path"]
