"""Physical surgery: a new, smaller model with the chosen channels removed, and its masked twin.

The user's model is deep-copied and the copy's layers are sliced in place (their classes, hooks and
forward code are kept), so the result is a standalone ``nn.Module`` of the same type that runs the same
code — including branches only taken in training mode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidSettingError
from prune_env.graph import ChannelGroup, DependencyGraph, build_graph, check_module, units_to_keep
from prune_env.importance import Batches, Importance, get_importance, layer_tensor
from prune_env.surgery.keep import KeepSpec, select_units
from prune_env.surgery.plan import make_plan, resize, resized_modules


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ratios: float | Sequence[float] | Mapping[str, float] | np.ndarray,
    *,
    importance: str | Importance = "l1",
    graph: DependencyGraph | None = None,
    round_to: int = 1,
    seed: int | np.random.Generator | None = None,
    batches: Batches | None = None,
    global_ranking: bool = False,
) -> nn.Module:
    """Return a new, physically smaller copy of ``model`` with ``ratios`` of each group's channels removed.

    ``ratios``: one float for every group, a sequence with one per ``graph.groups`` entry, or a mapping
    from group name to ratio (missing groups are not pruned). A ratio is the fraction of the group's
    channels removed; at least one channel always stays and ratio 0 keeps the group whole.
    ``importance``: "l1", "l2", "bn_scale", "fpgm", "random" (seeded by ``seed``), the data-driven
    "taylor" and "hrank" (which read a few of ``batches``: a callable yielding ``(inputs, labels)``
    training batches), or a callable ``(group, model) -> scores``; the lowest-scoring channels go first.
    ``graph``: a graph already built for this architecture (saves the trace). ``round_to``: kept counts are
    rounded to the nearest multiple (the rule ``graph.macs`` predicts with); a ``round_to`` so coarse that a
    group's count rounds to no multiple at all, leaving one channel where the ratio keeps more than two, is
    an :class:`InvalidSettingError` naming the group and the largest ``round_to`` that works (as the
    environments refuse one too coarse for their ``max_ratio``). ``global_ranking``: ``ratios`` (one float)
    is the fraction of *all* units removed, chosen across groups by their scores divided by their group's
    mean score (so groups of different scales compare), each group keeping at least ``round_to`` units.
    """
    check_module(model, "prune")
    if global_ranking and not isinstance(ratios, float | int):
        raise InvalidSettingError(
            f"global_ranking takes one ratio (the fraction of all units removed), got {type(ratios).__name__}"
        )
    if graph is None:
        graph = build_graph(model, example_inputs)
    else:
        check_graph(model, graph, "prune")
    score = get_importance(importance, seed, batches)
    keep_counts = graph.keep_counts(ratios, round_to)  # also checks the ratios
    scores: dict[int, np.ndarray] = {}
    if not global_ranking:
        check_rounding_for(graph, graph.ratio_vector(ratios), round_to)
    else:
        assert isinstance(ratios, float | int)  # checked above
        scores = {g: _checked_scores(score, group, model) for g, group in enumerate(graph.groups)}
        keep_counts = _global_keep_counts(graph, list(scores.values()), float(ratios), round_to)
    kept_indices: list[np.ndarray] = []  # per group: the unit indices that stay (not counts)
    for g, (group, k) in enumerate(zip(graph.groups, keep_counts, strict=True)):
        if k == group.units:
            kept_indices.append(np.arange(group.units))
            continue
        group_scores = scores[g] if g in scores else _checked_scores(score, group, model)
        # Stable sort: ties keep the lowest indices, so the result is deterministic.
        kept_indices.append(np.sort(np.argsort(-group_scores, kind="stable")[:k]))
    return _prune_channels(model, graph, kept_indices)


def _collapses(units: np.ndarray, ratios: np.ndarray, round_to: int) -> np.ndarray:
    """Per group: whether rounding to ``round_to`` rounds the count ``ratios`` keep to zero multiples, leaving
    one channel — and that is less than half of that count (a group asked to keep 1.5 channels keeping one
    is rounding; one asked to keep 8 keeping one is nearly all of it gone)."""
    asked = units * (1.0 - ratios)
    kept = units_to_keep(units, ratios, round_to)
    return (2 * kept < asked - 1e-9) & (kept % round_to != 0) & (kept < units)


def check_rounding_for(graph: DependencyGraph, ratios: np.ndarray, round_to: int) -> None:
    """Refuse ``round_to`` where it would prune a group to one channel though ``ratios`` keep more than two of
    it: the nearest multiple of a coarse ``round_to`` is zero, so the group would lose nearly everything
    without a word (a 16-channel group at ratio 0.5 with round_to=64 keeps 1 channel, not 8)."""
    units = np.array([g.units for g in graph.groups], dtype=np.int64)
    collapsed = np.flatnonzero(_collapses(units, ratios, round_to))
    if not collapsed.size:
        return
    asked = units * (1.0 - ratios)
    shown = ", ".join(
        f"{graph.groups[g].name!r} ({units[g]} channels, ratio {ratios[g]:.3g} keeps {asked[g]:.3g})"
        for g in collapsed[:3]
    )
    more = f" and {collapsed.size - 3} more groups" if collapsed.size > 3 else ""
    # A count rounds to no multiple when it is at most half of one, so round_to under twice the smallest
    # affected count works, and a finer grid never collapses a group that a coarser one did not.
    works = max(1, min(round_to - 1, int(np.ceil(2 * asked[collapsed].min())) - 1))
    while works > 1 and _collapses(units, ratios, works).any():
        works -= 1
    raise InvalidSettingError(
        f"round_to={round_to} would leave {shown}{more} 1 channel, as no multiple of {round_to} is near that "
        f"count; use round_to={works} or lower, or leave those groups whole (ratio 0)"
    )


def _checked_scores(score: Importance, group: ChannelGroup, model: nn.Module) -> np.ndarray:
    raw = score(group, model)
    try:
        scores = np.asarray(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidSettingError(
            f"importance returned scores for group {group.name!r} that are not real numbers ({exc}); "
            f"return {group.units} finite floats"
        ) from exc
    if scores.shape != (group.units,) or not np.all(np.isfinite(scores)):
        raise InvalidSettingError(
            f"importance returned {scores.shape} scores for group {group.name!r}; "
            f"expected {group.units} finite values"
        )
    return scores


def _global_keep_counts(
    graph: DependencyGraph, scores: list[np.ndarray], ratio: float, round_to: int
) -> np.ndarray:
    """Kept units per group when the ``ratio`` lowest-scoring units of the whole network go (scores
    relative to their group's mean), every group keeping at least ``round_to`` units (or all it has)."""
    units = np.array([g.units for g in graph.groups], dtype=np.int64)
    floor = np.minimum(units, round_to)
    relative = [s / (np.abs(s).mean() or 1.0) for s in scores]
    # Candidates for removal: each group's units beyond its floor, weakest first within the group.
    candidates = [(value, g) for g, r in enumerate(relative) for value in np.sort(r)[: units[g] - floor[g]]]
    candidates.sort(key=lambda c: c[0])
    removed = np.zeros(len(units), dtype=np.int64)
    for _, g in candidates[: int(np.floor(ratio * units.sum()))]:
        removed[g] += 1
    kept = units - removed
    # Rounded up to multiples of round_to, within each group's size.
    return np.minimum(units, -(-kept // round_to) * round_to)


def prune_channels(model: nn.Module, graph: DependencyGraph, keep: KeepSpec) -> nn.Module:
    """Return a pruned copy of ``model`` keeping exactly the given units of each group.

    ``keep``: per group (by index, by name, or as a sequence in ``graph.groups`` order) the unit indices to
    keep; groups not mentioned are kept whole. Indices must be distinct integers in ``range(channels)``
    and every mentioned group keeps at least one (:class:`InvalidRatiosError` otherwise). ``graph`` must
    describe ``model``'s architecture (:meth:`DependencyGraph.check_model`).
    """
    check_graph(model, graph, "prune_channels")
    return _prune_channels(model, graph, keep)


def check_graph(model: nn.Module, graph: Any, where: str) -> None:
    """The boundary check of every function taking (model, graph): both of the right type, and the graph
    built from this architecture — a foreign graph's positions would index the wrong weights."""
    check_module(model, where)
    if not isinstance(graph, DependencyGraph):
        raise InvalidSettingError(
            f"{where}: graph must be a DependencyGraph, got {type(graph).__name__}; "
            "build it with build_graph(model, x)"
        )
    graph.check_model(model, where)


def _prune_channels(model: nn.Module, graph: DependencyGraph, keep: KeepSpec) -> nn.Module:
    plan = make_plan(model, graph, keep)
    # Sliced tensors enter the copy through deepcopy's memo, so every weight is copied exactly once.
    new = copy.deepcopy(model, plan.memo())
    for module_name, attr, value in plan.attributes:
        setattr(new.get_submodule(module_name), attr, value)
    resize(resized_modules(zip(model.modules(), new.modules(), strict=True)))
    return new


def zero_units(model: nn.Module, graph: DependencyGraph, units: KeepSpec) -> None:
    """Zero, in place, every weight slice of the given units (the masked twin of pruning them).

    ``units``: per group (index, name, or one list per group) the unit indices to zero. Producers' filters
    and biases, normalisation scales and shifts, raw parameters and consumers' input columns are zeroed, so
    those channels contribute nothing: pruning them afterwards leaves the outputs unchanged in eval mode
    (unless a LayerNorm/GroupNorm normalises over them), which is how the tests prove surgery correct.
    """
    check_graph(model, graph, "zero_units")
    with torch.no_grad():
        for g, chosen in select_units(graph, units).items():
            group = graph.groups[g]
            for member in group.members:
                pos = np.asarray(member.positions).reshape(group.units, member.multiplicity)
                idx = torch.as_tensor(pos[chosen].reshape(-1), dtype=torch.long)
                if member.kind == "param":
                    layer_tensor(model, member.layer).index_fill_(member.dim, idx, 0.0)
                    continue
                module = model.get_submodule(member.layer)
                if member.kind == "in":
                    # Grouped/depthwise convs: a group's inputs and outputs are one unit, zeroed via "out".
                    weight = getattr(module, "weight", None)
                    if getattr(module, "groups", 1) == 1 and isinstance(weight, torch.Tensor):
                        weight.index_fill_(member.dim, idx, 0.0)
                    continue
                for attr in ("weight", "bias"):
                    t = getattr(module, attr, None)
                    if isinstance(t, torch.Tensor):
                        # The weight's axis the graph recorded (1 for a transposed conv's outputs).
                        t.index_fill_(member.dim if attr == "weight" else 0, idx, 0.0)
