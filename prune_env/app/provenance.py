"""Where a result came from, recorded beside it: the source revision, library versions, the hardware it ran
on, the command and every agent's full settings; and the check that refuses to compare results of
different code or different agent settings as if they were alike.

A benchmark directory keeps one *record* per invocation that added runs to it (``runs.json``,
``"provenance"``), and each run row carries its revision. Results put together from several records
(a resumed grid, :meth:`~prune_env.app.results.BenchmarkResults.combine`) are *mixed* when the records
disagree on the revision or on an agent's settings: :func:`check_unmixed` refuses that unless allowed,
and :func:`mixed_lines` says what was mixed when it was.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prune_env.errors import InvalidSettingError

UNKNOWN = "unknown"  # the revision of code that is not a git checkout, or of runs recorded before revisions
REVISION_FORMAT = re.compile(r"[0-9a-f]{40}(\+dirty)?|unknown")
# (distribution, module): versions recorded when the module is importable here.
LIBRARIES = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("gymnasium", "gymnasium"),
    ("stable-baselines3", "stable_baselines3"),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
)
_SHOWN = 3  # directories named per mixed value; the rest are counted


def git_revision(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), with ``+dirty`` when the
    checkout has uncommitted changes; ``None`` for an installed package or without git."""
    where = path if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def revision(path: Path | None = None) -> str:
    """:func:`git_revision` as recorded in results: ``"unknown"`` instead of ``None``, never an error.

    Without ``path`` it is the revision of this package's code, looked up once per process: the code a
    process runs is the code it imported, whatever is committed while it runs.
    """
    if path is None:
        return _package_revision()
    found = git_revision(path)
    return found if found is not None and REVISION_FORMAT.fullmatch(found) else UNKNOWN


@functools.cache
def _package_revision() -> str:
    here = Path(__file__).resolve()
    try:
        # An installed package can sit inside someone else's checkout (a virtualenv in a project): that
        # checkout's commit is not this code's, and it does not track this file.
        tracked = subprocess.run(
            ["git", "-C", str(here.parent), "ls-files", "--error-unmatch", "--", here.name],
            capture_output=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return revision(here.parent) if tracked.returncode == 0 else UNKNOWN


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or UNKNOWN


def hardware() -> dict[str, Any]:
    """Platform, CPU, core count, torch's thread count and the CUDA devices visible to this process."""
    import torch  # here, not above: reading results (which uses this module) needs no torch

    found: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        found["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return found


def library_versions() -> dict[str, str]:
    """Python's, this package's and each of :data:`LIBRARIES` that can be imported here."""
    import prune_env

    found = {"python": platform.python_version(), "prune_env": prune_env.__version__}
    for dist, module in LIBRARIES:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:  # importable from a source tree without installed metadata
            found[dist] = str(getattr(sys.modules.get(module), "__version__", UNKNOWN))
    return found


def plain(value: Any) -> Any:
    """``value`` as plain, deterministic JSON: dataclasses and mappings become objects, sequences lists,
    functions their qualified names, non-finite numbers strings; anything else its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return plain(value.tolist())
    if callable(value) and hasattr(value, "__qualname__"):
        # A repr would carry a memory address, which differs between processes running the same code.
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return str(value)


def agent_settings(
    agents: Sequence[tuple[str, str | Callable[..., Any]]], overrides: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``{label: {"agent": name, "settings": {...}}}``: each agent's full settings, defaults included (the
    registry's settings dataclass with the label's ``overrides`` applied); a user's function records the
    keyword settings it is given."""
    from agents.registry import resolve_agent

    found: dict[str, dict[str, Any]] = {}
    for label, agent in agents:
        given = dict(overrides.get(label, {}))
        if isinstance(agent, str):
            spec = resolve_agent(agent)
            found[label] = {"agent": spec.name, "settings": plain(spec.make_settings(given))}
        else:
            found[label] = {"agent": plain(agent), "settings": plain(given)}
    return found


def invocation_record() -> dict[str, Any]:
    """What made a result, now: the revision, time, command, library versions and hardware."""
    return {
        "revision": revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(sys.argv),
        "versions": library_versions(),
        "hardware": hardware(),
    }


def make_record(agents: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What one invocation of the harness records: :func:`invocation_record` and every agent's settings."""
    return {**invocation_record(), "agents": {str(k): dict(v) for k, v in agents.items()}}


# ------------------------------------------------------------------------------------------------ mixing


def _values(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """``(revisions, agents)``: each revision with the directories holding it; per agent label, each
    distinct settings (canonical JSON) with ``(settings, directories)``."""
    revisions: dict[str, list[str]] = {}
    agents: dict[str, dict[str, Any]] = {}
    for r in records:
        where = str(r.get("directory", "?"))
        found = revisions.setdefault(str(r.get("revision") or UNKNOWN), [])
        if where not in found:
            found.append(where)
        for label, settings in (r.get("agents") or {}).items():
            key = json.dumps(settings, sort_keys=True)
            _, dirs = agents.setdefault(str(label), {}).setdefault(key, (settings, []))
            if where not in dirs:
                dirs.append(where)
    return revisions, agents


def _where(dirs: Sequence[str]) -> str:
    more = f" and {len(dirs) - _SHOWN} more" if len(dirs) > _SHOWN else ""
    return ", ".join(dirs[:_SHOWN]) + more


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, str]:
    """The settings two records of one agent disagree on, as ``key=value`` lists of each."""
    left, right = dict(a.get("settings") or {}), dict(b.get("settings") or {})
    keys = sorted(k for k in set(left) | set(right) if left.get(k, "(absent)") != right.get(k, "(absent)"))
    named = [("agent", a.get("agent"), b.get("agent"))] if a.get("agent") != b.get("agent") else []
    named += [(k, left.get(k, "(absent)"), right.get(k, "(absent)")) for k in keys]
    return ", ".join(f"{k}={x!r}" for k, x, _ in named), ", ".join(f"{k}={y!r}" for k, _, y in named)


def _conflicts(records: Sequence[Mapping[str, Any]]) -> list[str]:
    revisions, agents = _values(records)
    found = []
    if len(revisions) > 1:
        found.append(
            "revisions differ: " + "; ".join(f"{rev} in {_where(d)}" for rev, d in revisions.items())
        )
    for label, by_value in agents.items():
        if len(by_value) > 1:
            (first, first_dirs), *others = by_value.values()
            for other, other_dirs in others:
                mine, theirs = _difference(first, other)
                found.append(
                    f"settings of agent {label!r} differ: {mine} in {_where(first_dirs)}; "
                    f"{theirs} in {_where(other_dirs)}"
                )
    return found


def check_unmixed(records: Sequence[Mapping[str, Any]], allow_mixed: bool) -> None:
    """Refuse records that disagree on the revision or an agent's settings, unless ``allow_mixed``.

    Each record names its ``"directory"``; the message names both values and where each was found.
    """
    if allow_mixed:
        return
    conflicts = _conflicts(records)
    if conflicts:
        raise InvalidSettingError(
            "; ".join(conflicts) + ". Results of other code or other agent settings are not comparable: "
            "keep them apart (another `out` directory, a separate report), or mix them knowingly with "
            "allow_mixed=True (--allow-mixed), and the table says so"
        )


def mixed_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """What mixed records mix, one line each (none when they agree)."""
    return [f"MIXED (allowed): {c}" for c in _conflicts(records)]


__all__ = [
    "LIBRARIES",
    "REVISION_FORMAT",
    "UNKNOWN",
    "agent_settings",
    "check_unmixed",
    "cpu_model",
    "git_revision",
    "hardware",
    "invocation_record",
    "library_versions",
    "make_record",
    "mixed_lines",
    "plain",
    "revision",
]
