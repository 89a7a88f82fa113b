"""Physical surgery: a new, smaller model with the chosen channels removed.

The user's model is deep-copied and the copy's layers are sliced in place (their classes, hooks and
forward code are kept), so the result is a standalone ``nn.Module`` of the same type that runs the same
code — including branches only taken in training mode.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidRatiosError, InvalidSettingError, UnsupportedLayerError
from prune_env.graph import (
    DependencyGraph,
    build_graph,
    check_module,
    layer_spec,
    spec_sizes,
    spec_tensors,
)
from prune_env.importance import Importance, get_importance, layer_tensor

KeepSpec = Mapping[str, Sequence[int]] | Mapping[int, Sequence[int]] | Sequence[Sequence[int]]


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ratios: float | Sequence[float] | Mapping[str, float] | np.ndarray,
    *,
    importance: str | Importance = "l1",
    graph: DependencyGraph | None = None,
    round_to: int = 1,
    seed: int | np.random.Generator | None = None,
) -> nn.Module:
    """Return a new, physically smaller copy of ``model`` with ``ratios`` of each group's channels removed.

    ``ratios``: one float for every group, a sequence with one per ``graph.groups`` entry, or a mapping
    from group name to ratio (missing groups are not pruned). A ratio is the fraction of the group's
    channels removed; at least one channel always stays and ratio 0 keeps the group whole.
    ``importance``: "l1", "l2", "bn_scale", "random" (seeded by ``seed``) or a callable
    ``(group, model) -> scores``; the lowest-scoring channels go first. ``graph``: a graph already built
    for this architecture (saves the trace). ``round_to``: kept counts are rounded to this multiple.
    """
    check_module(model, "prune")
    if graph is None:
        graph = build_graph(model, example_inputs)
    else:
        _check_graph(model, graph, "prune")
    score = get_importance(importance, seed)
    keep_counts = graph.keep_counts(ratios, round_to)
    keep: list[np.ndarray] = []
    for group, k in zip(graph.groups, keep_counts, strict=True):
        if k == group.channels:
            keep.append(np.arange(group.channels))
            continue
        raw = score(group, model)
        try:
            scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise InvalidSettingError(
                f"importance returned scores for group {group.name!r} that are not real numbers ({exc}); "
                f"return {group.channels} finite floats"
            ) from exc
        if scores.shape != (group.channels,) or not np.all(np.isfinite(scores)):
            raise InvalidSettingError(
                f"importance returned {scores.shape} scores for group {group.name!r}; "
                f"expected {group.channels} finite values"
            )
        # Stable sort: ties keep the lowest indices, so the result is deterministic.
        order = np.argsort(-scores, kind="stable")
        keep.append(np.sort(order[:k]))
    return _prune_channels(model, graph, keep)


def prune_channels(model: nn.Module, graph: DependencyGraph, keep: KeepSpec) -> nn.Module:
    """Return a pruned copy of ``model`` keeping exactly the given units of each group.

    ``keep``: per group (by index, by name, or as a sequence in ``graph.groups`` order) the unit indices to
    keep; groups not mentioned are kept whole. Indices must be distinct integers in ``range(channels)``
    and every mentioned group keeps at least one (:class:`InvalidRatiosError` otherwise). ``graph`` must
    describe ``model``'s architecture (:meth:`DependencyGraph.check_model`).
    """
    _check_graph(model, graph, "prune_channels")
    return _prune_channels(model, graph, keep)


def _check_graph(model: nn.Module, graph: Any, where: str) -> None:
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
    plan = _plan(model, graph, keep)
    # Sliced tensors enter the copy through deepcopy's memo, so every weight is copied exactly once.
    new = copy.deepcopy(model, plan.memo())
    for module_name, attr, value in plan.attributes:
        setattr(new.get_submodule(module_name), attr, value)
    _resize(_resized_modules(zip(model.modules(), new.modules(), strict=True)))
    return new


def _resized_modules(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Module, nn.Module, Any]]:
    """(pruned, original, resize) for every module whose declaration recomputes its literal sizes after
    surgery (``LayerSpec.resize``), children first so a parent reads its children's final sizes."""
    found = []
    for original, pruned in reversed(list(pairs)):
        spec = layer_spec(type(original))
        if spec is not None and spec.resize is not None:
            found.append((pruned, original, spec.resize))
    return found


def _resize(modules: Sequence[tuple[nn.Module, nn.Module, Any]]) -> None:
    for pruned, original, resize in modules:
        resize(pruned, original)


class ModelRebuilder:
    """Pruned models of one base model, each rebuilt into the same module objects: for hot loops.

    :func:`prune_channels` deep-copies the module tree for every pruned model; for a small network
    scored on a few hundred images that copy costs about as much as the scoring. A rebuilder copies the
    tree once and, per :meth:`rebuild`, only swaps tensors (fresh slices, or fresh clones of the base
    tensors, so whatever the previous user did to them — BN recalibration, SGD steps — is gone), size
    attributes and training flags. The returned module is the same object every time: use it for a
    throw-away evaluation and do not keep it across calls. The base model is only read.

    The surgery plan is compiled once: which tensor of which module is sliced along which dimension by
    which layer dimension (slot) of the graph, and each layer's size attributes as a function of its kept
    widths. Kept index tensors are cached per slot and kept units, so a rebuild is one ``index_select``
    (or ``clone``) per tensor plus dictionary lookups.
    """

    # Cached index tensors / attribute sets beyond this many are dropped (a long search with arbitrary,
    # non-ranked unit choices would otherwise grow the caches without bound).
    CACHE_LIMIT = 200_000

    def __init__(self, model: nn.Module, graph: DependencyGraph) -> None:
        _check_graph(model, graph, "ModelRebuilder")
        self.base = model
        self.graph = graph
        self.module = copy.deepcopy(model)
        self._base_modules = dict(model.named_modules(remove_duplicate=False))
        self._modules = dict(self.module.named_modules(remove_duplicate=False))
        self._pairs = [(self._base_modules[name], module) for name, module in self._modules.items()]
        self._resized = _resized_modules(self._pairs)
        self._compile()

    def _compile(self) -> None:
        graph = self.graph
        # Slots each group touches, and the groups that touch each slot (concatenations: several).
        slot_size = graph._slot_sizes
        slot_groups: dict[int, list[int]] = {}
        for g, rows in enumerate(graph._unit_positions):
            for s, *_ in rows:
                if g not in slot_groups.setdefault(s, []):
                    slot_groups[s].append(g)
        self._slot_groups = slot_groups
        self._group_slots = [sorted({s for s, *_ in rows}) for rows in graph._unit_positions]
        # Record the plan of the unpruned model with one full-width index tensor per slot: every slice
        # it would make names the slot by its index tensor's identity.
        probe = {s: torch.arange(size) for s, size in slot_size.items()}
        slot_of_probe = {id(idx): s for s, idx in probe.items()}
        by_layer: dict[str, dict[str, tuple[int, int]]] = {}
        for s in slot_size:
            slot = graph._slots[s]
            by_layer.setdefault(slot.layer, {})[slot.kind] = (slot.dim, s)
        recorder = _Plan(slicing=False)
        self._layer_kinds = by_layer
        self._slot_size = slot_size
        # Size attributes are set per "sizing unit": a layer whose dimensions set disjoint attributes
        # independently (a dense conv's in/out channels) gets one unit per dimension, so its cached
        # attributes depend on one width, not on every combination; others (grouped convs) get one unit.
        self._sizing: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []  # layer, kinds, their slots
        for layer, kinds in by_layer.items():
            names = tuple(sorted(kinds))
            _plan_layer(
                recorder,
                self._base_modules,
                layer,
                {k: (d, probe[s]) for k, (d, s) in kinds.items()},
                {k: slot_size[s] for k, (_, s) in kinds.items()},
            )
            units = [(k,) for k in names] if self._separable(layer, names) else [names]
            for unit in units:
                self._sizing.append((layer, unit, tuple(kinds[k][1] for k in unit)))
        # One operation per distinct base tensor (tied weights are one tensor): its slices in plan order
        # and every place of the copy that holds it.
        ops: dict[int, list] = {}
        for module_name, attr, dim, idx, t in recorder.slices:
            op = ops.setdefault(id(t), [t, [], set()])
            # A tied tensor is read by several layers along the same dim: the graph made their slots keep
            # the same indices, so it is sliced once per dim (by the first of them).
            if all(d != dim for d, _ in op[1]):
                op[1].append((dim, slot_of_probe[id(idx)]))
            op[2].add((module_name, attr))
        for name, base_module in self._base_modules.items():
            for registry in ("_parameters", "_buffers"):
                for key, t in getattr(base_module, registry).items():
                    if t is not None:
                        ops.setdefault(id(t), [t, [], set()])[2].add((name, key))
        self._ops = []
        for t, slices, places in ops.values():
            holders = [(_container(self._modules[name], attr), attr) for name, attr in sorted(places)]
            name, attr = min(places)
            # Where the base tensor lives, read at every rebuild: Module.to / double replace buffers (and
            # parameters' data), so a tensor captured now could be stale later.
            source = (_container(self._base_modules[name], attr), attr)
            self._ops.append((source, tuple(slices), tuple(holders), isinstance(t, nn.Parameter)))
        self._index_cache: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._dropped_cache: dict[tuple[int, bytes], dict[int, np.ndarray] | None] = {}
        self._attribute_cache: dict[tuple, list[tuple[Any, str, Any, bool]]] = {}
        self._layer_state: dict[tuple, tuple] = {}  # each sizing unit's widths at the last rebuild

    def rebuild(self, keep: KeepSpec) -> nn.Module:
        units = self._units(keep)
        # Units dropped per group, as positions per slot (None: the group is whole), cached by kept units.
        keys: list[bytes] = []
        dropped_of: list[dict[int, np.ndarray] | None] = []
        touched: set[int] = set()
        for g, kept in enumerate(units):
            key = kept.tobytes()
            keys.append(key)
            dropped = self._dropped_cache.get((g, key), _MISSING)
            if dropped is _MISSING:
                # Validated (in range, non-empty), sorted and made unique on first sight.
                dropped = _dropped_positions(self.graph, g, _normalise_keep(self.graph, {g: kept})[g])
                self._remember(self._dropped_cache, (g, key), dropped)
            dropped_of.append(dropped)  # type: ignore[arg-type]
            if dropped is not None:
                touched.update(self._group_slots[g])
        index: dict[int, torch.Tensor] = {}
        width: dict[int, int] = {}  # len(index[s]), without torch's slower __len__
        for s in touched:
            groups = self._slot_groups[s]
            cache_key = (s, *(keys[g] for g in groups))
            cached = self._index_cache.get(cache_key)
            if cached is None:
                mask = np.ones(self._slot_size[s], dtype=bool)
                for g in groups:
                    dropped = dropped_of[g]
                    if dropped is not None and s in dropped:
                        mask[dropped[s]] = False
                kept_positions = np.flatnonzero(mask)
                cached = (torch.from_numpy(kept_positions), len(kept_positions))
                self._remember(self._index_cache, cache_key, cached)
            index[s], width[s] = cached
        self._swap_tensors(index)
        self._set_sizes(width)
        _resize(self._resized)
        for base_module, module in self._pairs:
            module.__dict__["training"] = base_module.training  # what Module.train() sets, minus recursion
        return self.module

    def _units(self, keep: KeepSpec) -> list[np.ndarray]:
        n = len(self.graph.groups)
        if isinstance(keep, (list, tuple)) and len(keep) == n:
            units = []
            for g, u in enumerate(keep):
                if isinstance(u, np.ndarray) and u.dtype.kind in "iu" and u.ndim == 1:
                    # The hot path (integer arrays): range, uniqueness and non-emptiness are validated
                    # when these units are first seen, in rebuild().
                    units.append(u.astype(np.int64, copy=False))
                else:
                    units.append(_unit_indices(self.graph, g, u))
            return units
        return _normalise_keep(self.graph, keep)

    @torch.no_grad()  # fresh tensors without autograd history: no detach per tensor
    def _swap_tensors(self, index: Mapping[int, torch.Tensor]) -> None:
        for (container, key), slices, holders, param in self._ops:
            base = t = container[key]
            for dim, s in slices:
                idx = index.get(s)
                if idx is not None:
                    if not t.is_cpu:  # index tensors are made on the CPU
                        idx = idx.to(t.device)
                    t = t.index_select(dim, idx)
            if t is base:
                t = base.clone()
            if param:
                t = nn.Parameter(t, requires_grad=base.requires_grad)
            for holder, attr in holders:
                holder[attr] = t

    def _attributes(self, layer: str, widths: Mapping[str, int]) -> list[tuple[str, str, Any]]:
        """(module name, attribute, value) the plan sets on ``layer`` for kept ``widths`` by dimension kind."""
        plan = _Plan(slicing=False)
        full = self._layer_kinds[layer]
        sizes = {k: self._slot_size[full[k][1]] for k in widths}
        _plan_layer(
            plan, self._base_modules, layer, {k: (full[k][0], range(w)) for k, w in widths.items()}, sizes
        )
        return plan.attributes

    def _separable(self, layer: str, kinds: tuple[str, ...]) -> bool:
        """Whether each dimension of ``layer`` alone sets its own attributes, which together are those of
        the whole layer (checked at full widths; the rebuild==prune_channels property tests the rest)."""
        if len(kinds) < 2:
            return False
        full = {k: self._slot_size[self._layer_kinds[layer][k][1]] for k in kinds}
        try:
            alone = [self._attributes(layer, {k: full[k]}) for k in kinds]
        except UnsupportedLayerError:
            return False
        names = [{(m, a) for m, a, _ in attrs} for attrs in alone]
        disjoint = sum(len(n) for n in names) == len(set().union(*names))
        together = sorted((m, a, repr(v)) for m, a, v in self._attributes(layer, full))
        return disjoint and together == sorted((m, a, repr(v)) for attrs in alone for m, a, v in attrs)

    def _set_sizes(self, width: Mapping[int, int]) -> None:
        for layer, kinds, slots in self._sizing:
            state_key = (layer, kinds)
            widths = tuple([width.get(s, -1) for s in slots])
            if self._layer_state.get(state_key) == widths:
                continue  # the module already has these size attributes
            cache_key = (state_key, widths)
            attributes = self._attribute_cache.get(cache_key)
            if attributes is None:
                attributes = []
                planned = self._attributes(
                    layer,
                    {
                        k: w if w >= 0 else self._slot_size[s]
                        for k, w, s in zip(kinds, widths, slots, strict=True)
                    },
                )
                for name, attr, value in planned:
                    module = self._modules[name]
                    # Plain values (sizes, group counts) go straight into the instance dict (see _set).
                    plain = not isinstance(value, (torch.Tensor, nn.Module))
                    attributes.append((module.__dict__ if plain else module, attr, value, plain))
                self._remember(self._attribute_cache, cache_key, attributes)
            for target, attr, value, plain in attributes:
                if plain:
                    target[attr] = value
                else:
                    setattr(target, attr, value)
            self._layer_state[state_key] = widths

    def _remember(self, cache: dict, key: Hashable, value: Any) -> None:
        if len(cache) >= self.CACHE_LIMIT:
            cache.clear()
        cache[key] = value


_MISSING = object()  # a cache miss, where None is a cached value


def _container(module: nn.Module, attr: str) -> dict[str, Any]:
    """The dictionary of ``module`` that holds tensor attribute ``attr``."""
    if attr in module._parameters:
        return module._parameters
    if attr in module._buffers:
        return module._buffers
    return module.__dict__  # a tensor kept as a plain attribute


def _set(module: nn.Module, attr: str, value: Any) -> None:
    # Module.__setattr__ checks every registry on each call; plain attributes (sizes, group counts) can
    # go straight into the instance dict, which is where it would put them.
    if isinstance(value, (torch.Tensor, nn.Module)):
        setattr(module, attr, value)
    else:
        module.__dict__[attr] = value


def _fresh(original: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as the same kind of tensor as ``original`` (a Parameter stays a Parameter)."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(value, requires_grad=original.requires_grad)
    return value


def _plan(
    model: nn.Module, graph: DependencyGraph, keep: KeepSpec, modules: Mapping[str, nn.Module] | None = None
) -> _Plan:
    """Every slice and size attribute that keeping ``keep`` needs, computed from ``model`` (read only).

    ``modules``: ``dict(model.named_modules())`` when the caller has it (saves the lookups)."""
    modules = modules if modules is not None else dict(model.named_modules(remove_duplicate=False))
    masks = _slot_masks(graph, _normalise_keep(graph, keep))
    by_layer: dict[str, dict[str, tuple[int, torch.Tensor]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for s, mask in masks.items():
        slot = graph._slots[s]
        by_layer.setdefault(slot.layer, {})[slot.kind] = (slot.dim, torch.from_numpy(np.flatnonzero(mask)))
        sizes.setdefault(slot.layer, {})[slot.kind] = len(mask)
    plan = _Plan()
    for layer, kinds in by_layer.items():
        _plan_layer(plan, modules, layer, kinds, sizes[layer])
    return plan


def _plan_layer(
    plan: _Plan,
    modules: Mapping[str, nn.Module],
    layer: str,
    kinds: dict[str, tuple[int, Any]],
    sizes: Mapping[str, int],
) -> None:
    """Plan one layer's slices and size attributes; ``kinds``: pruned dimension kind -> (dim, kept indices),
    ``sizes``: each pruned dimension's unpruned extent."""
    if "param" in kinds:
        _plan_raw_parameter(plan, modules, layer, *kinds["param"])
        return
    m = modules[layer]
    spec = layer_spec(type(m))
    if spec is not None and spec.channelwise:
        _plan_channelwise(plan, m, layer, spec, kinds, sizes)
        return
    _plan_module(plan, m, layer, kinds)
    if spec is not None and spec.like is not None and "out" in kinds:
        # Extra per-output-channel tensors of a layer declared like a torch layer (a filter gain).
        for path, _, dim in spec_tensors(m, spec, sizes["out"]):
            owner_path, _, attr = path.rpartition(".")
            owner_name = f"{layer}.{owner_path}" if owner_path else layer
            plan.slice(modules[owner_name], owner_name, attr, dim, kinds["out"][1])


def _plan_channelwise(
    plan: _Plan,
    m: nn.Module,
    layer: str,
    spec: Any,
    kinds: dict[str, tuple[int, Any]],
    sizes: Mapping[str, int],
) -> None:
    """A declared channel-wise layer: slice its per-channel tensors, set its channel-count attributes."""
    if set(kinds) != {"channel"}:
        raise UnsupportedLayerError(f"channel-wise layer {layer!r} with members {sorted(kinds)}")
    idx, size = kinds["channel"][1], sizes["channel"]
    for path, _, dim in spec_tensors(m, spec, size):
        owner_path, _, attr = path.rpartition(".")
        owner_name = f"{layer}.{owner_path}" if owner_path else layer
        plan.slice(m.get_submodule(owner_path) if owner_path else m, owner_name, attr, dim, idx)
    for path in spec_sizes(m, spec, size):
        owner_path, _, attr = path.rpartition(".")
        plan.set(f"{layer}.{owner_path}" if owner_path else layer, attr, len(idx))


class _Plan:
    """Slices computed from the original model (read only) and size attributes to set on the copy.

    With ``slicing=False`` it only records what it would slice (``slices``) and which attributes it sets:
    how :class:`ModelRebuilder` compiles a plan, with any sized object (a ``range``) as the indices."""

    def __init__(self, slicing: bool = True) -> None:
        self.slicing = slicing
        # id(original) -> (original, its slice so far, kept indices per dim sliced so far)
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor, dict[int, Any]]] = {}
        self.attributes: list[tuple[str, str, Any]] = []
        # (module name, attribute, dim, indices, original tensor) of every slice, recorded when not slicing
        self.slices: list[tuple[str, str, int, Any, torch.Tensor]] = []

    def slice(self, module: nn.Module, module_name: str, attr: str, dim: int, idx: torch.Tensor) -> None:
        """Keep the indices ``idx`` of ``module.attr`` along ``dim`` (a no-op when there is no such tensor)."""
        # The registries first: Module.__getattr__ is the slow path for parameters and buffers.
        t = module._parameters.get(attr)
        if t is None:
            t = module._buffers.get(attr)
        if t is None:
            t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor):
            return
        if not self.slicing:
            self.slices.append((module_name, attr, dim, idx, t))
            return
        entry = self.tensors.get(id(t))
        current, sliced = (entry[1], entry[2]) if entry is not None else (t.detach(), {})
        if dim in sliced:
            # A tied tensor, reached again through another layer that reads it: the graph coupled their
            # channels, so the kept indices agree and the tensor is sliced once.
            if not torch.equal(sliced[dim].cpu(), torch.as_tensor(idx).cpu()):
                raise UnsupportedLayerError(
                    f"{module_name}.{attr}: a tensor shared with another layer would be sliced two ways "
                    f"along dim {dim}; the graph does not describe this model's ties — build it from this "
                    "model: build_graph(model, x)"
                )
            return
        sliced = {**sliced, dim: idx}
        if idx.device != t.device:
            idx = idx.to(t.device)
        self.tensors[id(t)] = (t, current.index_select(dim, idx), sliced)

    def set(self, module_name: str, attr: str, value: Any) -> None:
        self.attributes.append((module_name, attr, value))

    def memo(self) -> dict[int, Any]:
        return {key: _fresh(original, new) for key, (original, new, _) in self.tensors.items()}


def _normalise_keep(graph: DependencyGraph, keep: KeepSpec) -> list[np.ndarray]:
    """Kept unit indices for every group (groups not mentioned keep all units)."""
    result = [np.arange(g.channels) for g in graph.groups]
    for g, arr in _select_units(graph, keep).items():
        if arr.size == 0:
            raise InvalidRatiosError(
                f"group {graph.groups[g].name!r} must keep at least one unit, got an empty list; keep one "
                "or more of its units, or leave the group out to keep it whole"
            )
        result[g] = arr
    return result


def _select_units(graph: DependencyGraph, spec: KeepSpec) -> dict[int, np.ndarray]:
    """Validated, sorted unit indices per mentioned group (by index, by name, or one list per group)."""
    n_groups = len(graph.groups)
    if isinstance(spec, Mapping):
        items: list[tuple[int, Any]] = []
        for key, idx in spec.items():
            if isinstance(key, str):
                try:
                    items.append((graph.groups.index(graph.group(key)), idx))
                except KeyError:
                    raise InvalidRatiosError(
                        f"unknown group name {key!r}; valid names are graph.groups[i].name, e.g. "
                        f"{[g.name for g in graph.groups[:5]]}"
                    ) from None
            elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
                items.append((int(key), idx))
            else:
                raise InvalidRatiosError(
                    f"groups are named by name (str) or index (int), got key {key!r}; use "
                    "graph.groups[i].name or i"
                )
        seen: set[int] = set()
        for g, _ in items:
            if g in seen:
                raise InvalidRatiosError(
                    f"group {graph.groups[g].name!r} is given twice (by name and by index); give it once"
                )
            seen.add(g)
    else:
        if isinstance(spec, (str, bytes)) or not hasattr(spec, "__len__"):
            raise InvalidRatiosError(
                f"units must be a mapping from group name or index to unit indices, or one list per group; "
                f"got {type(spec).__name__}"
            )
        if len(spec) != n_groups:
            raise InvalidRatiosError(f"expected {n_groups} unit lists (one per group), got {len(spec)}")
        items = list(enumerate(spec))
    selected: dict[int, np.ndarray] = {}
    for g, idx in items:
        if not 0 <= g < n_groups:
            raise InvalidRatiosError(
                f"group index {g} out of range: the graph has {n_groups} groups (valid indices 0 to "
                f"{n_groups - 1})"
            )
        selected[g] = _unit_indices(graph, g, idx)
    return selected


def _unit_indices(graph: DependencyGraph, g: int, idx: Any) -> np.ndarray:
    """Group ``g``'s unit indices ``idx`` as a sorted int64 array, or :class:`InvalidRatiosError` naming the
    group, the offending index and the valid range: integers only (numpy would truncate 1.7 to 1 and read
    ``True`` as 1), each once, within ``range(channels)`` (numpy would read -1 as the last unit)."""
    group = graph.groups[g]
    n = group.channels
    if isinstance(idx, (bool, np.bool_)) or (
        isinstance(idx, (list, tuple)) and any(isinstance(i, (bool, np.bool_)) for i in idx)
    ):
        raise InvalidRatiosError(
            f"unit indices of group {group.name!r} must be integers, got booleans; for a mask pass "
            "np.flatnonzero(mask)"
        )
    try:
        arr = np.asarray(idx)
    except (TypeError, ValueError) as exc:
        raise InvalidRatiosError(f"unit indices of group {group.name!r} must be integers ({exc})") from None
    if arr.ndim > 1:
        raise InvalidRatiosError(
            f"unit indices of group {group.name!r} must be a flat list of integers, got shape {arr.shape}"
        )
    arr = arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)  # an empty list: what it means depends on the caller
    if arr.dtype.kind not in "iu":
        what = (
            "booleans (for a mask pass np.flatnonzero(mask))"
            if arr.dtype.kind == "b"
            else (f"{arr.dtype} values such as {arr[:3].tolist()}")
        )
        raise InvalidRatiosError(
            f"unit indices of group {group.name!r} must be integers, got {what}; pass int indices in 0 "
            f"to {n - 1}"
        )
    arr = arr.astype(np.int64, copy=False)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise InvalidRatiosError(
            f"group {group.name!r} has {n} units (valid indices 0 to {n - 1}); got index {int(bad[0])}"
        )
    unique, counts = np.unique(arr, return_counts=True)
    if unique.size != arr.size:
        raise InvalidRatiosError(
            f"group {group.name!r}: unit index {int(unique[counts > 1][0])} is given more than once; "
            "give each unit once"
        )
    return unique


def _slot_masks(graph: DependencyGraph, keep: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Per layer dimension (slot) touched by pruning: a boolean mask of the indices that stay."""
    masks: dict[int, np.ndarray] = {}
    for g, kept in enumerate(keep):
        for s, positions in (_dropped_positions(graph, g, kept) or {}).items():
            if s not in masks:
                masks[s] = np.ones(graph._slot_sizes[s], dtype=bool)
            masks[s][positions] = False
    return masks


def _dropped_positions(graph: DependencyGraph, g: int, kept: np.ndarray) -> dict[int, np.ndarray] | None:
    """The indices of each slot that group ``g`` loses when it keeps the (validated, sorted) units ``kept``;
    ``None`` when it keeps them all."""
    group = graph.groups[g]
    if len(kept) == group.channels:
        return None
    dropped = np.ones(group.channels, dtype=bool)
    dropped[kept] = False
    positions: dict[int, list[np.ndarray]] = {}
    for s, _, pos, owner in graph._unit_positions[g]:
        positions.setdefault(s, []).append(pos[dropped[owner]])
    return {s: np.concatenate(p) for s, p in positions.items()}


def _plan_raw_parameter(
    plan: _Plan, modules: Mapping[str, nn.Module], qualname: str, dim: int, idx: torch.Tensor
) -> None:
    owner_name, _, attr = qualname.rpartition(".")
    owner = modules[owner_name]
    plan.slice(owner, owner_name, attr, dim, idx)
    # A norm layer traced through to its functional form (ConvNeXt's LayerNorm2d calls F.layer_norm with
    # self.normalized_shape): its size attributes must follow its parameters.
    kept = len(idx)
    if isinstance(owner, nn.LayerNorm) and attr in ("weight", "bias"):
        plan.set(owner_name, "normalized_shape", (kept,))
    elif isinstance(owner, nn.modules.batchnorm._NormBase):
        plan.set(owner_name, "num_features", kept)


def _plan_module(plan: _Plan, m: nn.Module, name: str, kinds: dict[str, tuple[int, Any]]) -> None:
    # Index tensors of the kept positions along each of the layer's pruned dimensions (None: untouched);
    # only their lengths are read here, besides handing them to plan.slice.
    out = kinds.get("out", (0, None))[1]
    inp = kinds.get("in", (1, None))[1]
    ch = kinds.get("channel", (0, None))[1]
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if out is not None:
            plan.slice(m, name, "weight", 0, out)
            plan.slice(m, name, "bias", 0, out)
        if m.groups > 1:
            # Whole groups go: keep the per-group width, shrink the group count.
            kept_out = len(out) if out is not None else m.out_channels
            new_groups = kept_out // (m.out_channels // m.groups)
            in_per_group = m.in_channels // m.groups
            if inp is not None and len(inp) != new_groups * in_per_group:
                raise UnsupportedLayerError(f"grouped conv {name!r}: inconsistent group removal")
            plan.set(name, "in_channels", new_groups * in_per_group)
            plan.set(name, "out_channels", kept_out)
            plan.set(name, "groups", new_groups)
            return
        if out is not None:
            plan.set(name, "out_channels", len(out))
        if inp is not None:
            plan.slice(m, name, "weight", 1, inp)
            plan.set(name, "in_channels", len(inp))
        return
    if isinstance(m, nn.Linear):
        if out is not None:
            plan.slice(m, name, "weight", 0, out)
            plan.slice(m, name, "bias", 0, out)
            plan.set(name, "out_features", len(out))
        if inp is not None:
            plan.slice(m, name, "weight", 1, inp)
            plan.set(name, "in_features", len(inp))
        return
    if ch is None:
        raise UnsupportedLayerError(
            f"no surgery for {type(m).__name__} {name!r} with members {sorted(kinds)}"
        )
    kept = len(ch)
    if isinstance(m, nn.GroupNorm):
        plan.set(name, "num_groups", m.num_groups * kept // m.num_channels)
        plan.set(name, "num_channels", kept)
    elif isinstance(m, nn.LayerNorm):
        plan.set(name, "normalized_shape", (kept,))
    elif isinstance(m, nn.PReLU):
        plan.set(name, "num_parameters", kept)
    elif hasattr(m, "num_features"):
        plan.set(name, "num_features", kept)
    else:
        raise UnsupportedLayerError(f"no surgery for {type(m).__name__} {name!r}")
    for attr in ("weight", "bias", "running_mean", "running_var"):
        plan.slice(m, name, attr, 0, ch)


def zero_units(model: nn.Module, graph: DependencyGraph, units: KeepSpec) -> None:
    """Zero, in place, every weight slice of the given units (the masked twin of pruning them).

    ``units``: per group (index, name, or one list per group) the unit indices to zero. Producers' filters
    and biases, normalisation scales and shifts, raw parameters and consumers' input columns are zeroed, so
    those channels contribute nothing: pruning them afterwards leaves the outputs unchanged in eval mode
    (unless a LayerNorm/GroupNorm normalises over them), which is how the tests prove surgery correct.
    """
    _check_graph(model, graph, "zero_units")
    with torch.no_grad():
        for g, chosen in _select_units(graph, units).items():
            group = graph.groups[g]
            for member in group.members:
                pos = np.asarray(member.positions).reshape(group.channels, member.multiplicity)
                idx = torch.as_tensor(pos[chosen].reshape(-1), dtype=torch.long)
                if member.kind == "param":
                    layer_tensor(model, member.layer).index_fill_(member.dim, idx, 0.0)
                    continue
                module = model.get_submodule(member.layer)
                if member.kind == "in":
                    # Grouped/depthwise convs: a group's inputs and outputs are one unit, zeroed via "out".
                    if getattr(module, "groups", 1) == 1:
                        module.weight.index_fill_(1, idx, 0.0)
                    continue
                for attr in ("weight", "bias"):
                    t = getattr(module, attr, None)
                    if isinstance(t, torch.Tensor):
                        t.index_fill_(0, idx, 0.0)
