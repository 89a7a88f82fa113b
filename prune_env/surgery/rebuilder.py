"""Pruned models of one base model rebuilt into one reused module tree (:class:`ModelRebuilder`)."""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import UnsupportedLayerError
from prune_env.graph import DependencyGraph
from prune_env.surgery.keep import KeepSpec, dropped_positions, normalise_keep, unit_indices
from prune_env.surgery.plan import Plan, plan_layer, resize, resized_modules
from prune_env.surgery.pruning import check_graph


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
        check_graph(model, graph, "ModelRebuilder")
        self.base = model
        self.graph = graph
        self.module = copy.deepcopy(model)
        self._base_modules = dict(model.named_modules(remove_duplicate=False))
        self._modules = dict(self.module.named_modules(remove_duplicate=False))
        self._pairs = [(self._base_modules[name], module) for name, module in self._modules.items()]
        self._resized = resized_modules(self._pairs)
        self._compile()

    def _compile(self) -> None:
        graph = self.graph
        # Slots each group touches, and the groups that touch each slot (concatenations: several).
        slot_size = {p.slot: graph.slots[p.slot].size for rows in graph.unit_positions for p in rows}
        slot_groups: dict[int, list[int]] = {}
        for g, rows in enumerate(graph.unit_positions):
            for p in rows:
                if g not in slot_groups.setdefault(p.slot, []):
                    slot_groups[p.slot].append(g)
        self._slot_groups = slot_groups
        self._group_slots = [sorted({p.slot for p in rows}) for rows in graph.unit_positions]
        # Record the plan of the unpruned model with one full-width index tensor per slot: every slice
        # it would make names the slot by its index tensor's identity.
        probe = {s: torch.arange(size) for s, size in slot_size.items()}
        slot_of_probe = {id(idx): s for s, idx in probe.items()}
        by_layer: dict[str, dict[str, tuple[int, int]]] = {}
        for s in slot_size:
            slot = graph.slots[s]
            by_layer.setdefault(slot.layer, {})[slot.kind] = (slot.dim, s)
        recorder = Plan(slicing=False)
        self._layer_kinds = by_layer
        self._slot_size = slot_size
        # Size attributes are set per "sizing unit": a layer whose dimensions set disjoint attributes
        # independently (a dense conv's in/out channels) gets one unit per dimension, so its cached
        # attributes depend on one width, not on every combination; others (grouped convs) get one unit.
        self._sizing: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []  # layer, kinds, their slots
        for layer, kinds in by_layer.items():
            names = tuple(sorted(kinds))
            plan_layer(
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
        ops: dict[int, list[Any]] = {}
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
        self._op_names: list[tuple[str, ...]] = []  # qualified names of each op's places
        for t, slices, places in ops.values():
            holders = [(_container(self._modules[name], attr), attr) for name, attr in sorted(places)]
            name, attr = min(places)
            # Where the base tensor lives, read at every rebuild: Module.to / double replace buffers (and
            # parameters' data), so a tensor captured now could be stale later.
            source = (_container(self._base_modules[name], attr), attr)
            self._ops.append((source, tuple(slices), tuple(holders), isinstance(t, nn.Parameter)))
            self._op_names.append(tuple(f"{m}.{a}" if m else a for m, a in sorted(places)))
        self._index: dict[int, torch.Tensor] = {}  # kept positions per touched slot, of the last rebuild
        self._index_cache: dict[tuple[Any, ...], tuple[torch.Tensor, int]] = {}
        self._dropped_cache: dict[tuple[int, bytes], dict[int, np.ndarray] | None] = {}
        self._attribute_cache: dict[tuple[Any, ...], list[tuple[Any, str, Any, bool]]] = {}
        self._layer_state: dict[
            tuple[Any, ...], tuple[Any, ...]
        ] = {}  # each sizing unit's widths at the last rebuild

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
                dropped = dropped_positions(self.graph, g, normalise_keep(self.graph, {g: kept})[g])
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
        self._index = index
        self._swap_tensors(index)
        self._set_sizes(width)
        resize(self._resized)
        for base_module, module in self._pairs:
            module.__dict__["training"] = base_module.training  # what Module.train() sets, minus recursion
        return self.module

    def kept_positions(self, slot: int) -> torch.Tensor | None:
        """Indices along ``graph.slots[slot]`` kept by the last :meth:`rebuild` (``None``: all of them)."""
        return self._index.get(slot)

    def slicings(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Per tensor (by its first qualified name): the ``(dim, slot)`` pairs it is sliced along."""
        return {names[0]: slices for (_, slices, _, _), names in zip(self._ops, self._op_names, strict=True)}

    def tensors(
        self, sources: Mapping[str, torch.Tensor] | None = None, *, buffers: bool = True
    ) -> dict[str, torch.Tensor]:
        """The last :meth:`rebuild`'s parameters (and buffers) by qualified name, sliced *with* autograd.

        Each tensor is sliced from the base model's current tensor, or from ``sources[name]`` where given
        (same shape as the base tensor: weights generated by another network, for instance), exactly as
        :meth:`rebuild` slices it, but gradients flow back to the source: ``torch.func.functional_call(
        rebuilder.module, rebuilder.tensors(), inputs)`` trains the base tensors through a sub-network, as
        a weight-sharing supernet does. Unsliced parameters are the source tensors themselves; buffers are
        fresh copies (a train-mode forward updates its statistics in them, never in the base model).
        """
        out: dict[str, torch.Tensor] = {}
        sources = sources or {}
        for ((container, key), slices, _, param), names in zip(self._ops, self._op_names, strict=True):
            if not param and not buffers:
                continue
            t = sources.get(names[0])
            if t is None:
                t = container[key]
            sliced = False
            for dim, s in slices:
                idx = self._index.get(s)
                if idx is not None:
                    t = t.index_select(dim, idx.to(t.device) if not t.is_cpu else idx)
                    sliced = True
            if not param:
                t = t.detach() if sliced else t.detach().clone()  # never the base model's own storage
            for name in names:
                out[name] = t
        return out

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
                    units.append(unit_indices(self.graph, g, u))
            return units
        return normalise_keep(self.graph, keep)

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
        plan = Plan(slicing=False)
        full = self._layer_kinds[layer]
        sizes = {k: self._slot_size[full[k][1]] for k in widths}
        plan_layer(
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
                    # Plain values (sizes, group counts) go straight into the instance dict, where
                    # Module.__setattr__ would put them after checking every registry.
                    plain = not isinstance(value, (torch.Tensor, nn.Module))
                    attributes.append((module.__dict__ if plain else module, attr, value, plain))
                self._remember(self._attribute_cache, cache_key, attributes)
            for target, attr, value, plain in attributes:
                if plain:
                    target[attr] = value
                else:
                    setattr(target, attr, value)
            self._layer_state[state_key] = widths

    def _remember(self, cache: dict[Any, Any], key: Hashable, value: Any) -> None:
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
