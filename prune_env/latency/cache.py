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
    return cache_dir(root) / TABLE_DIR / f"{name}-{cache_key(meta.key_fields())[:20]}.json"


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


def cached_table(
    expected: TableMeta,
    measure: Callable[[], LatencyTable],
    root: str | os.PathLike[str] | None = None,
    *,
    refresh: bool = False,
) -> tuple[LatencyTable, Path, bool]:
    """The cached table for ``expected``, else ``measure()`` saved to the cache.

    Returns the table, its file and whether it came from the cache. ``refresh``: measure anew whatever is
    cached. A cached file that is not a readable table is replaced with a warning; a readable table for
    other settings at that path (edited or copied there) is a :class:`LatencyTableError`.
    """
    path = table_path(expected, root)
    if path.exists() and not refresh:
        try:
            table = read_table(path)
        except LatencyTableError as exc:
            warnings.warn(
                f"ignoring an unusable cached latency table ({exc}); measuring it again", stacklevel=3
            )
        else:
            check_compatible(table.meta, expected, str(path))
            return table, path, True
    table = measure()
    save_table(table, path)
    return table, path, False


__all__ = ["TABLE_DIR", "cached_table", "load_table", "read_table", "save_table", "table_path"]
