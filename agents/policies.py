"""Pruning policies a search leaves behind: decide kept channels for any target with no evaluation.

Every channel search returns one (``SearchResult.policy``):

- the Stable-Baselines3 learners (ppo, a2c, sac, td3, ddpg, amc) an :class:`agents.sb3.SB3Policy`, which
  decides from the environment's observation — target included, so one trained over a ``budget_range``
  serves any target in it (CACP);
- SeerNet's (``predictor``) an :class:`agents.predictor.PredictorPolicy`, its trained accuracy predictor:
  for each target asked for, gradient ascent on the predicted accuracy under that target's cost barrier;
- every other agent an :class:`AllocationPolicy`, per-group ratios projected onto whatever target it is
  asked for: RL-Pruner's learned distribution (its mean), or the best allocation found (uniform, random,
  evolution). It is an allocation carried over to other budgets, not one learned per budget.

A policy is saved as a directory holding ``policy.json`` (its kind and settings) and, for a network, its
weights as plain tensors; :func:`load_policy` reads any kind back. Nothing is ever unpickled: a policy
directory is something users share, and unpickling a file runs whatever code it carries. JSON is parsed
strictly and every value checked, tensors are read with ``torch.load(weights_only=True)`` and checked
against the network rebuilt from the JSON, so a damaged or edited file is refused in one line naming it.
Every policy refuses a target outside the ``budget_range`` recorded in its own file.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidSettingError
from prune_env.fileio import write_atomic, write_text_atomic
from prune_env.problem import PruningProblem
from prune_env.serialize import loads_strict
from prune_env.validation import as_real, budget_range, fraction

POLICY_META = "policy.json"
# Version of the policy files: 2 holds no pickled data (SB3 policies before it were SB3's own policy.zip).
POLICY_FORMAT = 2
PICKLED_SB3_FILE = "policy.zip"
# Policy kinds saved by the learners' own modules: kind -> (module, class with ``from_meta(path, meta)``).
POLICY_KINDS = {"predictor": ("agents.predictor", "PredictorPolicy"), "sb3": ("agents.sb3", "SB3Policy")}
MAX_META_BYTES = 2**20  # a policy.json holds settings and at most a ratio per channel group
RESAVE = "the file is damaged or was edited: search again to save a new policy"
# Ratios may sit a rounding error above max_ratio (1 - keep/units computed in floating point).
RATIO_TOLERANCE = 1e-9


class Policy(Protocol):
    """What a saved or returned policy offers."""

    @property
    def budget_range(self) -> tuple[float, float] | None: ...

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray: ...

    def save(self, directory: str | Path) -> Path: ...


# ------------------------------------------------------------------------------------------------ checks


def refuse(file: Path, problem: str, fix: str = RESAVE) -> NoReturn:
    """Raise the one-line error for a policy file: which file, what is wrong, what to do."""
    raise InvalidSettingError(f"{file}: {problem}; {fix}")


def regular_file(file: Path, what: str) -> None:
    """Refuse a missing file, a link or anything but a regular file (a FIFO or device would never end)."""
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise InvalidSettingError(
            f"{file.parent} holds no saved policy ({file.name}, the {what}, is missing); save one with a "
            "policy's save(), or pass the policy directory of a finished budget-range search"
        ) from None
    except OSError as exc:
        raise InvalidSettingError(f"cannot read {file}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        refuse(
            file,
            f"the {what} is not a regular file (a link, directory or device)",
            "copy the file itself into the policy directory",
        )


def read_policy_meta(directory: str | Path) -> dict[str, Any]:
    """``policy.json`` of the policy saved in ``directory``, parsed strictly (no NaN, no duplicate key)."""
    file = Path(directory) / POLICY_META
    regular_file(file, "policy description")
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_META_BYTES + 1)
    except OSError as exc:
        raise InvalidSettingError(f"cannot read {file}: {exc.strerror}") from None
    if len(raw) > MAX_META_BYTES:
        refuse(file, f"larger than {MAX_META_BYTES // 2**20} MiB, not a policy description")
    try:
        meta = loads_strict(raw)
    except UnicodeDecodeError:
        refuse(file, "not UTF-8 text, not a policy description")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        refuse(file, f"not valid JSON ({' '.join(str(exc).split())[:160]})")
    if not isinstance(meta, dict):
        refuse(file, f"holds a JSON {type(meta).__name__}, not an object of policy settings")
    return meta


def meta_field(meta: Mapping[str, Any], key: str, file: Path, accepted: str, ok: Any) -> Any:
    """``meta[key]``, refused (naming the file, the key and what is accepted) if missing or not ``ok``."""
    if key not in meta:
        refuse(file, f"key {key!r} ({accepted}) is missing")
    value = meta[key]
    if not ok(value):
        refuse(file, f"{key!r} must be {accepted}, got {short_value(value)}")
    return value


def short_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_format(meta: Mapping[str, Any], file: Path, *, required: bool) -> None:
    """Refuse a format this version cannot read (``required``: a file without one is of the old format)."""
    if "format" not in meta and not required:
        return
    version = meta.get("format")
    if version != POLICY_FORMAT or isinstance(version, bool):
        refuse(
            file,
            f"policy file format {short_value(version)}, this prune-env reads format {POLICY_FORMAT}",
            "save the policy again with this version",
        )


def trained_range(meta: Mapping[str, Any], file: Path) -> tuple[float, float] | None:
    """The ``budget_range`` recorded in a policy file: ``None`` or a valid (low, high) pair of budgets."""
    span = meta.get("budget_range")
    if span is None:
        return None
    try:
        return budget_range("budget_range", list(span) if isinstance(span, list) else span)
    except InvalidSettingError as exc:
        refuse(file, str(exc))


def ratio_list(meta: Mapping[str, Any], key: str, file: Path) -> tuple[float, ...]:
    """A non-empty list of pruning ratios (each the fraction of a group removed, finite, in [0, 1])."""
    values = meta_field(meta, key, file, "a non-empty list of ratios", lambda v: isinstance(v, list) and v)
    out = []
    for i, value in enumerate(values):
        try:
            ratio = as_real(f"{key}[{i}]", value)
        except InvalidSettingError as exc:
            refuse(file, str(exc))
        if not 0.0 <= ratio <= 1.0:
            refuse(file, f"{key}[{i}] = {ratio!r} is not a ratio in [0, 1] (the fraction of a group removed)")
        out.append(ratio)
    return tuple(out)


def check_target_in_range(
    budget_range: tuple[float, float] | None, problem: PruningProblem, target: float | None, who: str
) -> float:
    """The target a policy is applied at (``target`` or the problem's), refused outside the range the
    policy was trained on: a policy is only known to decide well where its training episodes were."""
    goal = problem.target if target is None else fraction("target", target)
    if budget_range is not None:
        lo, hi = budget_range
        if not lo <= goal <= hi:
            raise InvalidSettingError(
                f"target {goal:g} lies outside the budget range {lo:g} to {hi:g} this {who} policy was "
                f"trained on; apply it within that range, or search again over a range covering {goal:g}"
            )
    return goal


def read_tensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors saved in ``file`` (a name -> tensor mapping), read without unpickling anything else."""
    regular_file(file, what)
    if file.stat().st_size == 0:
        refuse(file, f"the {what} is empty (the save did not finish)")
    try:
        # A damaged or hostile file makes torch's reader fail in many ways (UnpicklingError for anything
        # but tensors and containers, RuntimeError for a broken archive, EOFError, KeyError, ...): each
        # means the file is unusable, and the warnings on the way would only add noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False: exactly what must not happen.
        refuse(
            file,
            f"the {what} holds pickled objects other than tensors (or is no weights file at all) "
            "and is never loaded, since unpickling it could run code",
        )
    except Exception as exc:
        refuse(
            file,
            f"the {what} is damaged or truncated ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:120] or 'no details'})",
        )
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and type(v) is torch.Tensor for k, v in state.items()
    ):
        refuse(file, f"the {what} holds a {type(state).__name__}, not a mapping of names to tensors")
    return state


def load_tensors_into(module: nn.Module, state: Mapping[str, torch.Tensor], file: Path) -> None:
    """Load ``state`` strictly into ``module`` (rebuilt from the policy's JSON), or say which tensor does
    not fit: missing, extra, another shape or dtype, or NaN/inf."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        refuse(
            file,
            f"{len(missing)} tensors of the network its policy.json describes are absent "
            f"{missing[:2]} and {len(extra)} are unknown {extra[:2]}",
        )
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape or got.dtype != want.dtype or got.layout != torch.strided:
            refuse(
                file,
                f"tensor {name!r} is {got.dtype} {list(got.shape)}, the network its policy.json "
                f"describes has {want.dtype} {list(want.shape)}",
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            refuse(file, f"tensor {name!r} holds NaN or infinite values")
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------ allocation


@dataclass(frozen=True)
class AllocationPolicy:
    """An allocation of the pruning across channel groups (per-group ratios), projected onto any target by
    the problem's own projection — no evaluation spent.

    ``agent``: who found it; ``budget_range``: the targets it was searched for (``None``: its problem's).
    """

    agent: str
    ratios: tuple[float, ...]
    budget_range: tuple[float, float] | None = None

    def keep_for(self, problem: PruningProblem, target: float | None = None) -> np.ndarray:
        """Kept units per group at ``target`` (default: the problem's), within it by construction."""
        if problem.n_groups != len(self.ratios):
            raise InvalidSettingError(
                f"this {self.agent} allocation has {len(self.ratios)} ratios, the problem {problem.n_groups} "
                "channel groups: apply it to the problem (model and dataset) it was searched on"
            )
        goal = check_target_in_range(self.budget_range, problem, target, self.agent)
        ratios = np.asarray(self.ratios, dtype=np.float64)
        # A searched allocation records the ratios its kept counts realise; a group's smallest width is
        # rounded to whole units, so at its minimum it may remove slightly more than max_ratio (3 of 32
        # kept is 0.906 at max_ratio 0.9). That is still the allocation searched, not a clipped one.
        smallest = problem.projector.min_keep / problem.units
        over = np.flatnonzero(ratios > np.maximum(problem.max_ratio, 1.0 - smallest) + RATIO_TOLERANCE)
        if over.size:  # the projection would clip it: another allocation than the one searched
            g = int(over[0])
            raise InvalidSettingError(
                f"this {self.agent} allocation removes {ratios[g]:g} of group {problem.group_names[g]!r}, "
                f"more than this problem's max_ratio {problem.max_ratio:g}: apply it to the problem it was "
                "searched on (the same max_ratio)"
            )
        if target is not None:  # checked here, not in keep_for: environments call that every step
            problem.check_target(goal)
        return problem.keep_for(ratios, target)

    def save(self, directory: str | Path) -> Path:
        meta = {"agent": self.agent, "ratios": list(self.ratios)}
        return write_policy(directory, "allocation", meta, self.budget_range)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], file: Path) -> AllocationPolicy:
        """The allocation ``meta`` (read from ``file``) describes, every value checked."""
        check_format(meta, file, required=False)
        agent = meta_field(
            meta, "agent", file, "the name of the agent that found it", lambda v: isinstance(v, str)
        )
        return cls(agent, ratio_list(meta, "ratios", file), trained_range(meta, file))


# ------------------------------------------------------------------------------------------------ saving


def write_policy(
    directory: str | Path,
    kind: str,
    meta: Mapping[str, Any],
    budget_range: tuple[float, float] | None,
    weights: tuple[str, nn.Module] | None = None,
) -> Path:
    """Save a policy of ``kind`` in ``directory``: its network's weights (``(file name, module)``, plain
    tensors), then ``policy.json`` (kind, format, budget range and ``meta``) last, so that a directory whose
    save was interrupted holds no description to load. Every policy's ``save`` writes through here."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        name, module = weights
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        write_atomic(path / name, lambda f: torch.save(state, f), binary=True)
    description = {
        "kind": kind,
        "format": POLICY_FORMAT,
        **meta,
        "budget_range": None if budget_range is None else list(budget_range),
    }
    write_text_atomic(path / POLICY_META, json.dumps(description, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ loading


def pickled_policy_error(directory: Path) -> InvalidSettingError:
    """The refusal of a policy saved in SB3's pickled format, with how to convert a trusted one."""
    return InvalidSettingError(
        f"{directory / PICKLED_SB3_FILE} is a policy in Stable-Baselines3's old pickled format, which "
        "prune-env never loads (unpickling a file runs any code it carries); if you trust where it came "
        'from, convert it once with python -c "from agents.pickled_sb3 import convert_pickled_policy; '
        f"convert_pickled_policy('{directory}')\", or search again"
    )


def load_policy(directory: str | Path) -> Policy:
    """The policy saved in ``directory`` (by any policy's ``save``); nothing in it is unpickled."""
    path = Path(directory)
    file = path / POLICY_META
    meta = read_policy_meta(path)
    kind = meta.get("kind")
    if kind == "allocation":
        return AllocationPolicy.from_meta(meta, file)
    if not isinstance(kind, str) or kind not in POLICY_KINDS:
        refuse(
            file, f"unknown policy kind {short_value(kind)} (known: allocation, {', '.join(POLICY_KINDS)})"
        )
    # The module is imported by name, when its kind is loaded: the learners' modules build on this one
    # (and SB3's imports Stable-Baselines3), so this module never imports them back.
    module, cls = POLICY_KINDS[kind]
    policy_class = getattr(importlib.import_module(module), cls)
    return policy_class.from_meta(path, meta)


def is_finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
