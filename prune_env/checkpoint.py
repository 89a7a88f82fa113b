"""Saving and reloading pruned models without pickling code.

A saved model is a directory holding two files:

- ``model.json``: how to rebuild the architecture — the base architecture's zoo name (or ``"tv:NAME"``),
  ``num_classes``, ``in_channels``, ``input_shape``, and for every channel group (by name) the unit indices
  that were kept — plus free-form metadata and library versions;
- ``model.pt``: the pruned model's ``state_dict``, read back with ``torch.load(weights_only=True)``.

:func:`load_pruned` rebuilds the unpruned architecture, traces it with :func:`~prune_env.build_graph` on a
zero input, re-applies the same surgery with :func:`~prune_env.prune_channels`, and loads the weights
strictly. No module object is ever unpickled, so loading a file from someone else cannot run their code.

A user's own ``nn.Module`` has no zoo name: its pruned model is saved the same way with
``architecture=None``, and reloading it needs the unpruned architecture:
``load_pruned(path, base_model=MyNet())`` (the instance's weights do not matter; they are replaced).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import PruneEnvError
from prune_env.graph import build_graph
from prune_env.serialize import json_default
from prune_env.surgery import prune_channels

FORMAT = 1
SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.pt"


def versions() -> dict[str, str]:
    """Versions of the libraries a saved model or a result depends on (absent ones are skipped)."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for dist in ("prune-env", "torch", "torchvision", "gymnasium", "stable-baselines3", "numpy"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return found


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numpy scalars and arrays become numbers and lists)."""
    return json.loads(json.dumps(value, default=json_default))


def save_pruned(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    keep: Mapping[str, Sequence[int]],
    input_shape: Sequence[int],
    architecture: str | None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save a pruned ``model`` into directory ``path`` (created if needed); returns the directory.

    Args:
        model: the pruned model whose weights are saved (possibly fine-tuned after pruning).
        keep: for every channel group of the *unpruned* architecture's graph that was pruned, by group
            name, the kept unit indices (groups not listed were kept whole).
        input_shape: one sample's shape, e.g. ``(1, 8, 8)``; the graph is rebuilt on zeros of it.
        architecture: a zoo name for :func:`prune_env.models.get_model` (``"resnet20"``, ``"tv:resnet18"``),
            or ``None`` for a user's own model (reload with ``load_pruned(path, base_model=...)``).
        num_classes / in_channels: passed to ``get_model`` when rebuilding a zoo architecture.
        meta: anything JSON-serialisable to keep alongside (dataset, seed, accuracy...).
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "format": FORMAT,
        "architecture": architecture,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_shape": [int(s) for s in input_shape],
        "keep": {str(name): sorted(int(i) for i in units) for name, units in keep.items()},
        "meta": _jsonable(dict(meta or {})),
        "versions": versions(),
    }
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Write the weights first and the description last: a directory with model.json is complete.
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / WEIGHTS_FILE)
    tmp = directory / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, directory / SPEC_FILE)
    return directory


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.json`` description of a saved model (``path`` is its directory or the json file)."""
    p = Path(path)
    spec_file = p / SPEC_FILE if p.is_dir() else p
    if not spec_file.is_file():
        raise PruneEnvError(f"no saved pruned model at {p} (expected a directory with {SPEC_FILE})")
    try:
        spec = json.loads(spec_file.read_text())
    except json.JSONDecodeError as exc:
        raise PruneEnvError(f"{spec_file} is not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise PruneEnvError(f"{spec_file} is not a prune_env model description of format {FORMAT}")
    return spec


def _base_architecture(spec: Mapping[str, Any], base_model: nn.Module | None) -> nn.Module:
    if base_model is not None:
        return base_model
    arch = spec.get("architecture")
    if not arch:
        raise PruneEnvError(
            "this model was pruned from a user-defined architecture; reload it with "
            "load_pruned(path, base_model=<an instance of the unpruned model>)"
        )
    from prune_env.models import get_model

    # The initial weights are overwritten by the saved ones; fork the RNG so the caller's stream is
    # not consumed by the initialisation.
    with torch.random.fork_rng(devices=[]):
        return get_model(arch, int(spec.get("num_classes") or 10), int(spec.get("in_channels") or 3))


def load_pruned(
    path: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`: architecture, surgery and weights (eval mode).

    ``base_model``: an instance of the unpruned architecture, needed only for models saved with
    ``architecture=None``; it is not modified. Loading never unpickles code (``weights_only=True``).
    """
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    spec = read_spec(directory)
    base = _base_architecture(spec, base_model)
    example = torch.zeros(1, *spec["input_shape"])
    graph = build_graph(base, example)
    names = {g.name for g in graph.groups}
    missing = sorted(set(spec["keep"]) - names)
    if missing:
        raise PruneEnvError(
            f"saved model names channel groups {missing[:3]} that the architecture does not have; "
            "was it saved from another architecture or library version?"
        )
    pruned = prune_channels(base, graph, spec["keep"])
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise PruneEnvError(f"{weights} is missing")
    state = torch.load(weights, map_location=map_location, weights_only=True)
    try:
        pruned.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PruneEnvError(f"weights in {weights} do not fit the rebuilt architecture: {first}") from None
    return pruned.to(map_location).eval()


def kept_units(
    rankings: Sequence[np.ndarray], keep: Sequence[int], names: Sequence[str]
) -> dict[str, list[int]]:
    """Kept unit indices per group name for kept counts ``keep`` under a fixed ranking per group.

    This is how :meth:`prune_env.problem.PruningProblem.build` chooses units: the ``keep[g]`` first units
    of ``rankings[g]``, sorted.
    """
    return {
        name: sorted(int(i) for i in order[: int(k)])
        for name, order, k in zip(names, rankings, keep, strict=True)
    }


__all__ = ["kept_units", "load_pruned", "read_spec", "save_pruned", "versions"]
