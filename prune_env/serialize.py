"""JSON for results and metadata: numpy values and paths become plain numbers, lists and strings when
written; files a user may have edited are read strictly (no NaN or Infinity, no key given twice)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import numpy as np


def json_default(value: Any) -> Any:
    """``default=`` for :func:`json.dumps`: numpy arrays/scalars and paths; anything else is an error."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``pairs`` as a dict; a key given twice is a ValueError (an ``object_pairs_hook`` for json.loads)."""
    # A duplicated key is how a hand-edit hides a second value behind the first: refuse it.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def loads_strict(raw: bytes) -> Any:
    """``raw`` (UTF-8 JSON) parsed with NaN, Infinity and duplicated keys refused. Raises
    :class:`UnicodeDecodeError` for bytes that are not UTF-8 and :class:`ValueError` (a JSONDecodeError
    for bad syntax) naming what is wrong — both ValueErrors — and RecursionError for absurd nesting."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=unique_keys)
