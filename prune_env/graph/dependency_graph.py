"""The dependency graph as users see it: channel groups, exact costs for any ratios, and the rule that turns
ratios into kept unit counts."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from prune_env.costs import CostModel
from prune_env.errors import InvalidRatiosError, InvalidSettingError
from prune_env.graph.values import ChannelGroup, MemberPositions, Slot


def check_module(model: Any, where: str) -> None:
    """``model`` must be an ``nn.Module``; a TypeError naming ``where`` and the fix otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{where}: model must be a torch.nn.Module, got {type(model).__name__}; pass the network itself "
            "(a function or a state dict cannot be traced or pruned)"
        )


_Signature = tuple[str, tuple[tuple[str, int], ...], tuple[tuple[str, tuple[int, ...], str], ...]]

# Module attributes besides tensor shapes that decide how channels are grouped (a grouped conv's weight
# has the same shape for other group counts).
_STRUCTURAL_ATTRIBUTES = ("groups", "num_groups")


def model_signature(model: nn.Module) -> dict[str, _Signature]:
    """Per module (by qualified name): type, structural attributes, and each tensor's shape and, if it is
    tied, the qualified name it first appears under (ties decide how surgery slices). Dtypes, devices and
    values are not part of it."""
    first_name: dict[int, str] = {}
    signature: dict[str, _Signature] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        tensors = []
        for registry in (m._parameters, m._buffers):
            for attr, t in registry.items():
                if t is not None:
                    qualified = f"{name}.{attr}" if name else attr
                    first = first_name.setdefault(id(t), qualified)
                    tensors.append((attr, tuple(t.shape), first if first != qualified else ""))
        attributes = tuple(
            (a, v) for a in _STRUCTURAL_ATTRIBUTES if isinstance(v := getattr(m, a, None), int)
        )
        signature[name] = (type(m).__name__, attributes, tuple(tensors))
    return signature


def _describe_signature(sig: _Signature) -> str:
    kind, attributes, tensors = sig
    parts = [f"{a}={v}" for a, v in attributes]
    for attr, shape, tied_to in tensors:
        parts.append(f"{attr} {shape}" + (f" tied to {tied_to}" if tied_to else ""))
    return f"{kind}({', '.join(parts)})"


def _real_ratios(value: Any, what: str) -> np.ndarray:
    """``value`` as a float array, or :class:`InvalidRatiosError` when it is not real numbers.

    numpy would turn ``True`` into 1.0 (prune everything), ``"0.5"`` into 0.5 and drop an imaginary part
    with only a warning: each of those is a caller's mistake, so it is rejected instead."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in value):
        raise InvalidRatiosError(f"{what} must be real numbers, not booleans; pass fractions in [0, 1]")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRatiosError(
            f"{what} must be real numbers in [0, 1], got {value!r:.80} ({exc})"
        ) from None
    if arr.dtype.kind not in "iuf":
        kind = {"b": "booleans", "c": "complex numbers", "U": "strings", "S": "bytes"}.get(
            arr.dtype.kind, f"{arr.dtype} values"
        )
        raise InvalidRatiosError(
            f"{what} must be real numbers in [0, 1], got {kind} ({value!r:.80}); pass the fraction of each "
            "group's channels to remove, e.g. 0.5"
        )
    return arr.astype(np.float64, copy=False)


def check_round_to(round_to: Any) -> None:
    """``round_to`` must be a positive integer (a width multiple), else :class:`InvalidSettingError`."""
    if isinstance(round_to, (bool, np.bool_)) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise InvalidSettingError(
            f"round_to must be a positive integer (kept widths are rounded to its multiples), got "
            f"{round_to!r}; pass e.g. round_to=1 (no rounding) or round_to=8"
        )


def units_to_keep(channels: Any, ratios: Any, round_to: int = 1) -> np.ndarray:
    """How many of each group's ``channels`` units survive pruning ``ratios`` of them (at least one).

    Vectorised (rows of ratios allowed). The kept count is rounded to the nearest multiple of
    ``round_to`` (hardware-friendly widths), never below one unit, never above the original. This is the one
    rule every caller uses — :func:`prune_env.prune`, ``graph.macs`` and the budget projection — so
    predicted and built models agree.
    """
    channels = np.asarray(channels, dtype=np.int64)
    ratios = np.asarray(ratios, dtype=np.float64)
    kept = channels * (1.0 - ratios)
    if round_to > 1:
        kept = np.round(kept / round_to) * round_to
    kept = np.where(ratios <= 0.0, channels, kept)  # ratio 0 is the identity, whatever the rounding
    return np.clip(np.round(kept), 1, channels).astype(np.int64)


def unit_count_to_keep(channels: int, ratio: float, round_to: int = 1) -> int:
    """:func:`units_to_keep` for one group, in Python scalars (the layer-wise environment's per-step path).

    The same arithmetic in the same order (IEEE doubles, round-half-even), so the two always agree."""
    if ratio <= 0.0:
        return channels
    kept = channels * (1.0 - ratio)
    if round_to > 1:
        kept = round(kept / round_to) * round_to
    return min(max(round(kept), 1), channels)


class DependencyGraph:
    """Channel groups of a model and the exact cost of any pruning of them.

    Build with :func:`build_graph`. ``groups`` holds the prunable groups in topological order;
    ``frozen`` names the channels that can never be pruned and why.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[ChannelGroup],
        frozen: dict[str, str],
        costs: CostModel,
        member_slots: Sequence[tuple[int, ...]],
        slots: tuple[Slot, ...],
    ) -> None:
        self.model = model
        self.groups = groups
        self.frozen = frozen
        self.costs = costs
        # Every layer dimension the graph maps, numbered as in unit_positions and the cost model.
        self.slots = slots
        self._member_slots = member_slots  # per group, the slot of each member
        self.base_macs = costs.macs(costs.full_keep())
        self.base_params = costs.params(costs.full_keep())
        self._name_index = {g.name: i for i, g in enumerate(groups)}
        self._signature = model_signature(model)

    def __len__(self) -> int:
        return len(self.groups)

    def check_model(self, model: Any, where: str = "this function") -> None:
        """Raise :class:`InvalidSettingError` unless ``model`` has the architecture this graph describes.

        The check is structural, not identity: every module's qualified name and type, the shapes of its
        parameters and buffers, which of them are tied, and its group counts must equal those of the
        model the graph was built from. A deep copy, a reloaded state dict, ``.double()`` or ``.to()``, or
        another instance of the same architecture passes (that is how :class:`ModelRebuilder` and the
        environments use one graph for several copies); a model whose layers differ is rejected before
        anything is indexed with the graph's positions. Costs a walk over the modules, no forward pass.
        """
        check_module(model, where)
        ours = model_signature(model)
        if ours == self._signature:
            return
        theirs = self._signature
        problem = ""
        for name in [*theirs, *(n for n in ours if n not in theirs)]:
            label = f"module {name!r}" if name else "the root module"
            if name not in ours:
                problem = f"{label} ({theirs[name][0]}) of the graph's model is missing here"
            elif name not in theirs:
                problem = f"this model has {label} ({ours[name][0]}), which the graph's model does not"
            elif ours[name] != theirs[name]:
                problem = (
                    f"{label} is {_describe_signature(ours[name])} here but "
                    f"{_describe_signature(theirs[name])} in the graph's model"
                )
            if problem:
                break
        raise InvalidSettingError(
            f"{where}: the graph was built from a different model ({type(self.model).__name__}): {problem}; "
            "build the graph from this model: build_graph(model, x)"
        )

    @functools.cached_property
    def unit_positions(self) -> tuple[tuple[MemberPositions, ...], ...]:
        """Per group, per member: which indices of which slot each unit owns (built on first use).

        What surgery reads to drop units: a dropped unit ``u`` of group ``g`` takes
        ``p.positions[p.units == u]`` of slot ``p.slot`` for every ``p`` in ``unit_positions[g]``."""
        table = []
        for group, slots in zip(self.groups, self._member_slots, strict=True):
            rows = []
            for s, member in zip(slots, group.members, strict=True):
                positions = np.asarray(member.positions, dtype=np.int64).reshape(-1)
                units = np.repeat(np.arange(group.units), member.multiplicity)
                rows.append(MemberPositions(s, positions, units))
            table.append(tuple(rows))
        return tuple(table)

    def __repr__(self) -> str:
        return (
            f"DependencyGraph({type(self.model).__name__}: {len(self.groups)} prunable groups, "
            f"{self.base_macs:,} MACs, {self.base_params:,} params)"
        )

    # -- ratios ---------------------------------------------------------------------------------------
    def ratio_vector(self, ratios: float | Sequence[float] | Mapping[str, float] | np.ndarray) -> np.ndarray:
        """Normalise float / sequence / mapping ratios to one float per group, validating them."""
        n = len(self.groups)
        if isinstance(ratios, Mapping):
            unknown = sorted((k for k in ratios if k not in self._name_index), key=repr)
            if unknown:
                raise InvalidRatiosError(
                    f"unknown group name(s) {unknown[:5]}; valid names are graph.groups[i].name, e.g. "
                    f"{[g.name for g in self.groups[:5]]}"
                )
            vec = np.zeros(n)
            for k, r in ratios.items():
                value = _real_ratios(r, f"the ratio of group {k!r}")
                if value.ndim != 0:
                    raise InvalidRatiosError(
                        f"the ratio of group {k!r} must be one number, got shape {value.shape}"
                    )
                vec[self._name_index[k]] = float(value)
        elif isinstance(ratios, (int, float, np.floating, np.integer)) and not isinstance(ratios, bool):
            vec = np.full(n, float(ratios))
        else:
            vec = _real_ratios(ratios, "ratios")
            if vec.ndim == 0:  # a 0-d array or tensor: one ratio, as a float is
                vec = np.full(n, float(vec))
            elif vec.shape != (n,):
                # Flattening a (1, n) or (n, 1) array would accept what the environments refuse, and a
                # (2, n/2) array would silently pair ratios with the wrong groups.
                raise InvalidRatiosError(
                    f"expected {n} ratios (a flat sequence, one per group), got shape {vec.shape}"
                    + (
                        "; if it holds one ratio per group in graph.groups order, pass ratios.reshape(-1)"
                        if vec.size == n
                        else ""
                    )
                )
        if not np.all(np.isfinite(vec)):
            raise InvalidRatiosError(f"ratios must be finite, got {vec[~np.isfinite(vec)][:5]}")
        if np.any(vec < 0) or np.any(vec > 1):
            raise InvalidRatiosError(f"ratios must lie in [0, 1], got min {vec.min():g}, max {vec.max():g}")
        return vec

    def keep_counts(self, ratios: Any, round_to: int = 1) -> np.ndarray:
        """Units kept per group for ``ratios``; the same rule :func:`prune_env.prune` applies."""
        check_round_to(round_to)
        return units_to_keep([g.units for g in self.groups], self.ratio_vector(ratios), round_to)

    # -- costs ----------------------------------------------------------------------------------------
    def macs(self, ratios: Any = 0.0, round_to: int = 1) -> int:
        """Exact multiply-accumulates of the model pruned at ``ratios``, without a forward pass."""
        return self.costs.macs(self.keep_counts(ratios, round_to))

    def params(self, ratios: Any = 0.0, round_to: int = 1) -> int:
        """Exact parameter count of the model pruned at ``ratios``, without a forward pass."""
        return self.costs.params(self.keep_counts(ratios, round_to))

    # -- helpers for surgery / importance ------------------------------------------------------------
    def group(self, key: int | str) -> ChannelGroup:
        return self.groups[self._name_index[key] if isinstance(key, str) else key]

    def details(self) -> str:
        return "\n".join(g.details() for g in self.groups)

    def table(self) -> str:
        """One line per group: name, units, number of members, producers."""
        rows = [f"{'#':>3} {'group':<40} {'units':>6} {'members':>7}  producers"]
        for g in self.groups:
            prods = ", ".join(m.layer for m in g.producers[:3]) + (" …" if len(g.producers) > 3 else "")
            rows.append(f"{g.index:>3} {g.name[:40]:<40} {g.units:>6} {len(g.members):>7}  {prods}")
        return "\n".join(rows)
