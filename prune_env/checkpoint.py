"""Saving and reloading pruned models without pickling code.

A saved model is a directory holding two regular files (never symbolic links):

- ``model.json``: how to rebuild the architecture — the base architecture's zoo name (or ``"tv:NAME"``),
  ``num_classes``, ``in_channels``, ``input_shape``, and for every channel group (by name) the unit indices
  that were kept — plus the pruned model's ``macs`` and ``params``, free-form metadata and library versions;
- ``model.pt``: the pruned model's ``state_dict``, read back with ``torch.load(weights_only=True)``.

:func:`load_pruned` rebuilds the unpruned architecture, traces it with :func:`~prune_env.build_graph` on a
zero input, re-applies the same surgery with :func:`~prune_env.prune_channels`, and loads the weights
strictly. No module object is ever unpickled, so loading a file from someone else cannot run their code.

Both files are untrusted input. ``model.json`` is checked by one schema (:func:`validate_spec`: types,
ranges, sizes); the weights must be a mapping of names to finite tensors whose shapes are exactly the
rebuilt model's; and the description must agree with the weights: the rebuilt graph's exact MACs and
parameter count for the saved channels must equal those recorded at save time. The weights alone do not
fix the input size (global pooling accepts any), so this is what catches an edited ``input_shape``.
Format 1 descriptions (written before costs were recorded) are still read, without that last check.
Every failure is a :class:`~prune_env.errors.CheckpointError` naming the file and the problem.

A user's own ``nn.Module`` has no zoo name: its pruned model is saved the same way with
``architecture=None``, and reloading it needs the unpruned architecture:
``load_pruned(path, base_model=MyNet())`` (the instance's weights do not matter; they are replaced).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from prune_env.costs import count_macs, count_params
from prune_env.device import resolve_device
from prune_env.errors import CheckpointError, InvalidSettingError, PruneEnvError
from prune_env.fileio import write_atomic, write_text_atomic
from prune_env.graph import DependencyGraph, build_graph
from prune_env.serialize import json_default, loads_strict
from prune_env.surgery import prune_channels
from prune_env.trusted_files import open_regular, read_weights

# Format 2 records the pruned model's MACs and parameter count (format 1, which did not, was never released).
FORMAT = 2
SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.pt"

# Sanity bounds on a description. They are far above any real model of this library (ImageNet-21k has
# 21,841 classes; hyperspectral inputs a few hundred bands) and far below sizes whose rebuilding alone
# would exhaust memory: a tampered description must fail fast, not allocate a 10^9-class head.
MAX_SPEC_BYTES = 64 * 2**20
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 4096
MAX_INPUT_DIMS = 4  # (C, L), (C, H, W) or (C, D, H, W)
MAX_INPUT_SIDE = 16_384
MAX_INPUT_NUMEL = 2**24  # one sample: 3 x 2364 x 2364
MAX_UNIT_INDEX = 2**31 - 1
MAX_NAME_CHARS = 1000


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


# ------------------------------------------------------------------------------------------------ schema


def _is_int(value: Any, low: int, high: int) -> bool:
    """A JSON integer within [low, high]: not a bool (``True`` is an int in Python), not a float."""
    return type(value) is int and low <= value <= high


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_spec(spec: Any, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a saved model's description (the parsed ``model.json``) and return it normalised.

    The one schema every description passes through, when loading and (via :func:`save_pruned`) when
    saving: the type and range of every field, and the fields' consistency with each other. ``keep`` lists
    come back sorted. Raises :class:`CheckpointError` naming ``source`` and the first problem found.
    """

    def bad(problem: str) -> NoReturn:
        raise CheckpointError(
            f"{source} is not a valid saved-model description: {problem} (edited, damaged or not written "
            "by prune_env); re-save the model"
        )

    fmt = spec.get("format") if isinstance(spec, dict) else None
    if type(fmt) is int and fmt > FORMAT:
        raise CheckpointError(
            f"{source} has format {fmt}, newer than this prune_env reads ({FORMAT}); upgrade prune_env"
        )
    return _validated(spec, bad)


def _validated(spec: Any, bad: Callable[[str], NoReturn]) -> dict[str, Any]:
    """:func:`validate_spec`'s rules; ``bad(problem)`` raises the caller's error."""
    if not isinstance(spec, dict):
        bad(f"expected a JSON object, got {type(spec).__name__}")
    fmt = spec.get("format")
    if fmt != FORMAT or type(fmt) is not int:
        bad(f"'format' must be {FORMAT}, got {_short(fmt)}; re-save the model with this prune_env")
    required = ["architecture", "num_classes", "in_channels", "input_shape", "keep", "meta", "macs", "params"]
    absent = [key for key in required if key not in spec]
    if absent:
        bad(f"missing {', '.join(repr(k) for k in absent)}")

    arch = spec["architecture"]
    if arch is not None and not (isinstance(arch, str) and 0 < len(arch) <= MAX_NAME_CHARS):
        bad(f"'architecture' must be a model name or null, got {_short(arch)}")
    num_classes, in_channels = spec["num_classes"], spec["in_channels"]
    if num_classes is not None and not _is_int(num_classes, 1, MAX_CLASSES):
        bad(f"'num_classes' must be an integer in [1, {MAX_CLASSES}] or null, got {_short(num_classes)}")
    if in_channels is not None and not _is_int(in_channels, 1, MAX_IN_CHANNELS):
        bad(f"'in_channels' must be an integer in [1, {MAX_IN_CHANNELS}] or null, got {_short(in_channels)}")

    shape = spec["input_shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_INPUT_DIMS
        or not all(_is_int(s, 1, MAX_INPUT_SIDE) for s in shape)
    ):
        bad(
            f"'input_shape' must be a list of 1 to {MAX_INPUT_DIMS} integers in [1, {MAX_INPUT_SIDE}] "
            f"(one sample's shape, e.g. [3, 32, 32]), got {_short(shape)}"
        )
    if math.prod(shape) > MAX_INPUT_NUMEL:
        bad(f"'input_shape' {shape} has {math.prod(shape):,} values, more than {MAX_INPUT_NUMEL:,}")
    # A zoo architecture is built for in_channels and traced on zeros of input_shape: they must agree.
    if arch is not None and in_channels is not None and shape[0] != in_channels:
        bad(f"'input_shape' {shape} has {shape[0]} channels but 'in_channels' is {in_channels}")

    keep = spec["keep"]
    if not isinstance(keep, dict):
        bad(f"'keep' must map channel group names to lists of kept unit indices, got {_short(keep)}")
    normalised: dict[str, list[int]] = {}
    for name, units in keep.items():
        if not 0 < len(name) <= MAX_NAME_CHARS:
            bad(f"'keep' has a group name of {len(name)} characters")
        if not isinstance(units, list) or not units:
            bad(f"'keep'[{name!r}] must be a non-empty list of unit indices, got {_short(units)}")
        if not all(_is_int(u, 0, MAX_UNIT_INDEX) for u in units):
            bad(f"'keep'[{name!r}] must hold non-negative integers, got {_short(units)}")
        if len(set(units)) != len(units):
            bad(f"'keep'[{name!r}] lists a unit twice")
        normalised[name] = sorted(units)

    if not isinstance(spec["meta"], dict):
        bad(f"'meta' must be a JSON object, got {_short(spec['meta'])}")
    found_versions = spec.get("versions", {})
    if not isinstance(found_versions, dict) or not all(isinstance(v, str) for v in found_versions.values()):
        bad(f"'versions' must map library names to version strings, got {_short(found_versions)}")
    for key in ("macs", "params"):
        if not _is_int(spec[key], 0, 2**63 - 1):
            bad(f"{key!r} must be a non-negative integer, got {_short(spec[key])}")
    return {**spec, "keep": normalised}


# ------------------------------------------------------------------------------------------------ files


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``model.json`` description of a saved model (``path``: its directory or the json file).

    Raises :class:`CheckpointError` when there is no description, it is not a regular file, not JSON, or
    fails :func:`validate_spec`.
    """
    p = Path(path)
    spec_file = p / SPEC_FILE if p.is_dir() else p
    if not os.path.lexists(spec_file):
        raise CheckpointError(
            f"no saved pruned model at {p} (expected a directory with {SPEC_FILE}, as written by "
            "save_pruned or `prune-env search`)"
        )
    with open_regular(spec_file, "model description") as fh:
        raw = fh.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise CheckpointError(
            f"{spec_file} is larger than {MAX_SPEC_BYTES // 2**20} MiB; not a model description"
        )
    try:
        spec = loads_strict(raw)
    except UnicodeDecodeError:
        raise CheckpointError(f"{spec_file} is not UTF-8 text; not a model description") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{spec_file} is not valid JSON ({' '.join(str(exc).split())})") from None
    return validate_spec(spec, spec_file)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], weights: Path) -> None:
    """Load ``state`` strictly into ``model``, or say which tensor does not fit and why."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        if mismatched:
            k = mismatched[0]
            detail = (
                f"{k!r} has shape {list(state[k].shape)} in the weights but {list(expected[k].shape)} "
                "in the model the description rebuilds"
            )
        elif missing:
            detail = f"{len(missing)} tensors the rebuilt model needs are absent (first {missing[0]!r})"
        else:
            detail = f"{len(unexpected)} tensors the rebuilt model does not have (first {unexpected[0]!r})"
        raise CheckpointError(
            f"weights in {weights} do not fit the rebuilt architecture: {detail}; {SPEC_FILE}'s "
            "architecture, num_classes, in_channels or keep disagree with the weights"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a dtype torch cannot copy, a sparse tensor where a dense one goes, ...
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"weights in {weights} do not fit the rebuilt architecture: {first}") from None


# ------------------------------------------------------------------------------------------------ save


def _first_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def save_pruned(
    path: str | os.PathLike[str],
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
        num_classes: passed to ``get_model`` when rebuilding a zoo architecture.
        in_channels: passed to ``get_model`` when rebuilding a zoo architecture.
        meta: anything JSON-serialisable to keep alongside (dataset, seed, accuracy...).

    The description is checked by the same schema :func:`load_pruned` applies (a bad argument raises
    :class:`InvalidSettingError`), and records ``model``'s MACs and parameter count on zeros of
    ``input_shape`` so that loading can verify the description against the weights.
    """
    directory = Path(path)

    def bad(problem: str) -> NoReturn:  # the caller's arguments, not a file, are wrong
        raise InvalidSettingError(f"save_pruned({str(directory)!r}): {problem}")

    spec: dict[str, Any] = {
        "format": FORMAT,
        "architecture": architecture,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_shape": [int(s) for s in input_shape],
        "keep": {str(name): [int(i) for i in units] for name, units in keep.items()},
        "macs": 0,  # measured below, once input_shape is known to be sane
        "params": int(count_params(model)),
        "meta": _jsonable(dict(meta or {})),
        "versions": versions(),
    }
    spec = _validated(spec, bad)
    try:
        spec["macs"] = int(
            count_macs(model, torch.zeros(1, *spec["input_shape"], device=_first_device(model)))
        )
    except RuntimeError as exc:  # torch's shape errors
        bad(f"the model cannot run on input_shape {spec['input_shape']}: {' '.join(str(exc).split())[:200]}")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Write the weights first and the description last: a directory with model.json is complete. An
    # older description goes first, so an interrupted re-save never pairs it with the new weights.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / SPEC_FILE)
    write_atomic(directory / WEIGHTS_FILE, lambda f: torch.save(state, f), binary=True)
    write_text_atomic(directory / SPEC_FILE, json.dumps(spec, indent=2) + "\n")
    return directory


# ------------------------------------------------------------------------------------------------ load


def _base_architecture(spec: Mapping[str, Any], base_model: nn.Module | None, spec_file: Path) -> nn.Module:
    if base_model is not None:
        return base_model
    arch = spec["architecture"]
    if arch is None:
        raise CheckpointError(
            f"{spec_file}: this model was pruned from a user-defined architecture; reload it with "
            "load_pruned(path, base_model=<an instance of the unpruned model>)"
        )
    from prune_env.models import get_model

    # The initial weights are overwritten by the saved ones; fork the RNG so the caller's stream is
    # not consumed by the initialisation.
    try:
        with torch.random.fork_rng(devices=[]):
            return get_model(arch, spec["num_classes"] or 10, spec["in_channels"] or 3)
    except (PruneEnvError, ValueError) as exc:  # an unknown name or sizes the architecture refuses
        raise CheckpointError(f"{spec_file}: cannot rebuild architecture {arch!r}: {exc}") from None


def _kept_units(spec: Mapping[str, Any], graph: DependencyGraph, spec_file: Path) -> dict[str, list[int]]:
    """The saved ``keep`` checked against the rebuilt graph: known groups, unit indices in range."""
    channels = {g.name: g.units for g in graph.groups}
    unknown = sorted(set(spec["keep"]) - set(channels))
    if unknown:
        raise CheckpointError(
            f"{spec_file} names channel groups {unknown[:3]} that the architecture does not have; "
            "was it saved from another architecture or library version?"
        )
    for name, units in spec["keep"].items():
        if units[-1] >= channels[name]:
            raise CheckpointError(
                f"{spec_file}: group {name!r} has {channels[name]} units but keep lists unit {units[-1]}; "
                "the description does not belong to this architecture"
            )
    return dict(spec["keep"])


def _check_costs(
    spec: Mapping[str, Any], graph: DependencyGraph, keep: Mapping[str, list[int]], spec_file: Path
) -> None:
    """The rebuilt model's exact costs must be the ones recorded when it was saved (format >= 2)."""
    counts = np.array(
        [len(keep[g.name]) if g.name in keep else g.units for g in graph.groups], dtype=np.int64
    )
    macs, params = graph.costs.macs(counts), graph.costs.params(counts)
    if (macs, params) != (spec["macs"], spec["params"]):
        raise CheckpointError(
            f"{spec_file} records {spec['macs']:,} MACs and {spec['params']:,} parameters, but the model it "
            f"describes (input_shape {spec['input_shape']}) has {macs:,} MACs and {params:,} parameters: the "
            "description does not match the saved model (edited input_shape, keep or architecture?)"
        )


def load_pruned_with_spec(
    path: str | os.PathLike[str],
    base_model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_pruned`, also returning the validated description the model was rebuilt from (read
    once, so the two cannot disagree)."""
    device = resolve_device(map_location)
    directory = Path(path)
    if os.path.lexists(directory) and not directory.is_dir():  # the model.json file itself
        directory = directory.parent
    spec_file = directory / SPEC_FILE
    spec = read_spec(directory)
    weights = directory / WEIGHTS_FILE
    state = read_weights(weights)  # before the (slower) rebuild: a broken file fails at once
    base = _base_architecture(spec, base_model, spec_file)
    try:
        graph = build_graph(base, torch.zeros(1, *spec["input_shape"]))
    except RuntimeError as exc:  # torch's shape errors: the architecture cannot take that input
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{spec_file}: the architecture cannot run on input_shape {spec['input_shape']}: {first}"
        ) from None
    keep = _kept_units(spec, graph, spec_file)
    pruned = prune_channels(base, graph, keep)
    _load_state(pruned, state, weights)
    if spec["format"] >= 2:
        _check_costs(spec, graph, keep, spec_file)
    return pruned.to(device).eval(), spec


def load_pruned(
    path: str | os.PathLike[str],
    base_model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`: architecture, surgery and weights (eval mode).

    ``base_model``: an instance of the unpruned architecture, needed only for models saved with
    ``architecture=None``; it is not modified. Loading never unpickles code (``weights_only=True``).
    A missing, tampered or inconsistent directory raises :class:`CheckpointError`.
    """
    return load_pruned_with_spec(path, base_model, map_location=map_location)[0]


def kept_units(
    rankings: Sequence[np.ndarray], keep: Sequence[int] | np.ndarray, names: Sequence[str]
) -> dict[str, list[int]]:
    """Kept unit indices per group name for kept counts ``keep`` under a fixed ranking per group.

    This is how :meth:`prune_env.problem.PruningProblem.build` chooses units: the ``keep[g]`` first units
    of ``rankings[g]``, sorted.
    """
    return {
        name: sorted(int(i) for i in order[: int(k)])
        for name, order, k in zip(names, rankings, keep, strict=True)
    }


__all__ = [
    "kept_units",
    "load_pruned",
    "load_pruned_with_spec",
    "read_spec",
    "save_pruned",
    "validate_spec",
    "versions",
]
