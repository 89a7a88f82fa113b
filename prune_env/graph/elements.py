"""Channel elements: the ids propagated next to every value, and the record the propagation builds.

A value's *ids* are an int64 tensor broadcastable to it whose entries name channel elements (an axis along
which the ids are constant has extent 1, so ids stay small). :class:`State` allocates elements, records
which ones must go together (union edges, resolved later by union-find), the layer dimensions they run
along (slots), and how parameters and MACs depend on those dimensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from prune_env.graph.values import SlotKind

POISON = 0  # the element of model inputs and outputs and of anything unmapped: never pruned
Ids = Any  # torch.Tensor | tuple | list | dict | None, nested like the value it describes


def varying_axes(ids: torch.Tensor) -> list[int]:
    return [a for a, s in enumerate(ids.shape) if s > 1]


def compress(ids: torch.Tensor) -> torch.Tensor:
    """Shrink every axis along which the ids are constant to size 1 (keeps broadcasting valid)."""
    for axis in range(ids.ndim):
        if ids.shape[axis] > 1:
            first = ids.narrow(axis, 0, 1)
            if bool((ids == first).all()):
                ids = first
    return ids.contiguous()


def channel_vector(ids: torch.Tensor, axis: int) -> torch.Tensor | None:
    """Ids along ``axis`` when the ids vary along no other axis (a "channel-pure" tensor), else None."""
    axis = axis % ids.ndim
    if any(s > 1 for a, s in enumerate(ids.shape) if a != axis):
        return None
    return ids.reshape(-1)


def along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return vector.reshape(shape)


@dataclass
class SlotRecord:
    """A layer dimension whose indices map to channel elements, as propagation finds it (resolution turns
    it into a public :class:`~prune_env.graph.values.Slot` and the members of groups)."""

    layer: str
    layer_type: str
    kind: SlotKind
    dim: int
    ids: np.ndarray  # element id per index along ``dim`` (for raw params: per element, full shape)
    param_shape: tuple[int, ...] | None = None  # raw parameters only


@dataclass
class ParamUse:
    """How one parameter's numel depends on slots: numel = coef * prod(kept(slot) for slot in slots)."""

    name: str
    coef: int
    slots: tuple[int, ...]


@dataclass
class TensorUse:
    """How one use of a tensor indexes it: a layer reading its weight, or traced code fetching it.

    ``dims`` maps a dimension of the tensor to the slot whose indices run along it; a dimension not in
    ``dims`` is used whole. A fetched parameter (``raw_slot``) learns its dimension only at resolution.
    """

    shape: tuple[int, ...]
    dims: dict[int, int]
    raw_slot: int | None = None


@dataclass
class State:
    """Everything propagation learns about a model, resolved into groups and costs afterwards."""

    next_id: int = 1
    # Allocations (start, length, space): a space is one producer's channels (conv/linear outputs); derived
    # elements (grouped-conv outputs, raw parameters) have space -1 and join groups only through unions.
    allocations: list[tuple[int, int, int]] = field(default_factory=lambda: [(0, 1, 0)])  # 0 = poison
    n_spaces: int = 1
    edges_a: list[np.ndarray] = field(default_factory=list)
    edges_b: list[np.ndarray] = field(default_factory=list)
    slots: list[SlotRecord] = field(default_factory=list)
    slot_index: dict[tuple[str, str], int] = field(default_factory=dict)
    macs_terms: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    # The module each MACs term is counted for (its qualified name; "" for a function or method call).
    macs_term_layers: list[str] = field(default_factory=list)
    param_uses: dict[str, ParamUse] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    record_costs: bool = True
    # Tied tensors: one tensor may be read by several layers (``b.weight = a.weight``) or by a layer and
    # traced code. Keyed by id(tensor), the first qualified name of each tensor and every use of it.
    tensor_names: dict[int, str] = field(default_factory=dict)
    tensor_uses: dict[int, dict[str, TensorUse]] = field(default_factory=dict)

    def copy(self) -> State:
        """An independent copy to run a pass on, so that a failed pass leaves this record as it was.

        Containers are copied; the arrays and records they hold are never changed in place once stored
        (a pass only appends, or replaces entries), except a slot's fields, so slots are copied too."""
        return dataclasses.replace(
            self,
            allocations=list(self.allocations),
            edges_a=list(self.edges_a),
            edges_b=list(self.edges_b),
            slots=[dataclasses.replace(s) for s in self.slots],
            slot_index=dict(self.slot_index),
            macs_terms=list(self.macs_terms),
            macs_term_layers=list(self.macs_term_layers),
            param_uses=dict(self.param_uses),
            unmapped=dict(self.unmapped),
            tensor_names=dict(self.tensor_names),
            tensor_uses={key: dict(uses) for key, uses in self.tensor_uses.items()},
        )

    # -- elements -------------------------------------------------------------------------------------
    def fresh(self, n: int, producer: bool = True) -> torch.Tensor:
        start = self.next_id
        self.next_id += n
        space = -1
        if producer:
            space, self.n_spaces = self.n_spaces, self.n_spaces + 1
        self.allocations.append((start, n, space))
        return torch.arange(start, start + n, dtype=torch.int64)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        self.edges_a.append(a.reshape(-1).numpy().copy())
        self.edges_b.append(b.reshape(-1).numpy().copy())

    def poison(self, ids: Ids, node: torch.fx.Node | None = None, reason: str = "") -> None:
        for t in tensors_in(ids):
            if bool((t != POISON).any()):
                self.union(t.reshape(-1), torch.zeros(1, dtype=torch.int64))
                if node is not None and reason:
                    self.unmapped.setdefault(node.name, reason)

    # -- slots ----------------------------------------------------------------------------------------
    def slot(self, layer: str, layer_type: str, kind: SlotKind, dim: int, ids: torch.Tensor) -> int:
        """Register (or, for a module called twice, re-unify) the slot ``(layer, kind)``."""
        key = (layer, kind)
        if key in self.slot_index:
            idx = self.slot_index[key]
            self.union(torch.from_numpy(self.slots[idx].ids), ids.reshape(-1))
            return idx
        self.slot_index[key] = len(self.slots)
        self.slots.append(SlotRecord(layer, layer_type, kind, dim, ids.reshape(-1).numpy().copy()))
        return len(self.slots) - 1

    def out_slot(
        self, layer: str, layer_type: str, n: int, dim: int = 0, producer: bool = True
    ) -> tuple[int, torch.Tensor]:
        key = (layer, "out")
        if key in self.slot_index:
            idx = self.slot_index[key]
            return idx, torch.from_numpy(self.slots[idx].ids)
        ids = self.fresh(n, producer)
        return self.slot(layer, layer_type, "out", dim, ids), ids

    def use_tensor(
        self, site: str, tensor: torch.Tensor, dims: Mapping[int, int], raw_slot: int | None = None
    ) -> None:
        """Record that ``site`` indexes ``tensor``'s dim ``d`` by slot ``dims[d]`` (other dims whole).

        A site (a layer's attribute, a fetched parameter) keeps its first record: a layer called twice
        indexes its tensors the same way each time."""
        uses = self.tensor_uses.setdefault(id(tensor), {})
        if site not in uses:
            uses[site] = TensorUse(tuple(tensor.shape), dict(dims), raw_slot)

    def use_param(self, name: str, tensor: torch.Tensor, slots: Mapping[int, int]) -> None:
        """Record that parameter ``name`` has dim ``d`` pruned along slot ``slots[d]``."""
        self.use_tensor(name, tensor, slots)
        # A tied tensor is one parameter under its first name, whichever layer records it.
        name = self.tensor_names.get(id(tensor), name)
        if name in self.param_uses:
            return
        coef = 1
        for d, s in enumerate(tensor.shape):
            if d not in slots:
                coef *= s
        self.param_uses[name] = ParamUse(name, coef, tuple(slots[d] for d in sorted(slots)))


def tensors_in(ids: Ids) -> Iterable[torch.Tensor]:
    if isinstance(ids, torch.Tensor):
        yield ids
    elif isinstance(ids, (tuple, list)):
        for x in ids:
            yield from tensors_in(x)
    elif isinstance(ids, dict):
        for x in ids.values():
            yield from tensors_in(x)


def poison_like(value: Any) -> Ids:
    if isinstance(value, torch.Tensor):
        return torch.zeros([1] * value.ndim, dtype=torch.int64)
    if isinstance(value, (tuple, list)):
        return (
            type(value)(poison_like(v) for v in value)
            if not hasattr(value, "_fields")
            else tuple(poison_like(v) for v in value)
        )
    if isinstance(value, dict):
        return {k: poison_like(v) for k, v in value.items()}
    return None


def axis_ids(ids: torch.Tensor, axis: int) -> list[np.ndarray]:
    """The channel ids a size of ``axis`` counts: none when the ids are constant along it."""
    if ids.shape[axis] == 1:
        return []
    return [ids.movedim(axis, 0).reshape(ids.shape[axis], -1)[:, 0].numpy().copy()]


def flat_sources(src: Any) -> list[np.ndarray]:
    if src is None:
        return []
    if isinstance(src, tuple):
        return [v for axis in src for v in axis]
    return list(src)


def flat_channels(ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """One id per channel position of a tensor: its varying axes, flattened in memory order."""
    varying = varying_axes(ids)
    if not varying:
        return ids.reshape(-1)[:1]
    index = [slice(None) if a in varying else slice(0, 1) for a in range(ids.ndim)]
    full = ids.expand(*[shape[a] if a in varying else 1 for a in range(ids.ndim)])
    return full[tuple(index)].reshape(-1)
