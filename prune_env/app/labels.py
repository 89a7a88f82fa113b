"""The names a benchmark grid gives its agents, models, datasets and rewards in the results it writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prune_env.errors import InvalidSettingError


def label(obj: Any, what: str) -> str:
    """How a grid names ``obj`` (a ``what``: agent, model, dataset or reward) in its results."""
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


def labelled(items: Sequence[Any] | Mapping[str, Any] | Any, what: str) -> list[tuple[str, Any]]:
    """``[(label, item)]``: a mapping gives its own labels; strings, Splits and callables are named."""
    if isinstance(items, Mapping):
        return [(str(k), v) for k, v in items.items()]
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        items = [items]
    pairs = [(label(x, what), x) for x in items]
    labels = [p[0] for p in pairs]
    if len(set(labels)) != len(labels):
        raise InvalidSettingError(
            f"{what} labels must be unique, got {labels}; pass a dict {{label: {what}}}"
        )
    return pairs
