"""Bit plans: how many bits each layer's weights and input activations get.

A :class:`BitPlan` names layers (qualified module names, the same in a model and in every pruned copy of
it) and their weight and activation bits; a layer it does not name stays at full precision (32-bit floats).
Only convolutions and linear layers are quantized: their weights per output channel, their inputs per
tensor (:mod:`prune_env.quantization.fakequant`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from prune_env.errors import InvalidSettingError
from prune_env.graph import DependencyGraph
from prune_env.serialize import unique_keys
from prune_env.validation import bits as bits_rule
from prune_env.validation import close_names

FULL_PRECISION = 32
BIT_CHOICES = (2, 3, 4, 5, 6, 8, FULL_PRECISION)  # what the environments offer (HAQ's and SeerNet's range)
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_bits(name: str, bits: Any) -> int:
    """Bits of a fixed-point format (2..16) or FULL_PRECISION (32: left as floats): the shared rule."""
    return bits_rule(name, bits)


@dataclass(frozen=True)
class BitPlan:
    """Weight and activation bits per layer (qualified module names); others are full precision."""

    weights: Mapping[str, int] = field(default_factory=dict)
    activations: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in ("weights", "activations"):
            table = getattr(self, kind)
            if not isinstance(table, Mapping):
                raise InvalidSettingError(
                    f"BitPlan.{kind} must map layer names to bits, got {type(table).__name__}"
                )
            for layer in table:
                if not isinstance(layer, str) or not layer:
                    raise InvalidSettingError(
                        f"BitPlan.{kind} names layers by their qualified module names (non-empty strings, "
                        f"'0' for a Sequential's first layer), got {layer!r}"
                    )
            checked = {layer: check_bits(f"{kind} bits of {layer!r}", b) for layer, b in table.items()}
            object.__setattr__(self, kind, dict(sorted(checked.items())))

    @classmethod
    def uniform(cls, layers: Iterable[str], weight_bits: int, activation_bits: int | None = None) -> BitPlan:
        """Every one of ``layers`` at the same bits (activations at ``weight_bits`` unless given)."""
        names = list(layers)
        a = weight_bits if activation_bits is None else activation_bits
        return cls({n: weight_bits for n in names}, {n: a for n in names})

    def weight_bits(self, layer: str) -> int:
        return self.weights.get(layer, FULL_PRECISION)

    def activation_bits(self, layer: str) -> int:
        return self.activations.get(layer, FULL_PRECISION)

    def to_json(self) -> str:
        return json.dumps({"weights": self.weights, "activations": self.activations}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> BitPlan:
        """The plan :meth:`to_json` wrote (an ``activation_ranges`` entry, as saved beside a fake-quantized
        model, is allowed and not read); anything else — a layer named twice, NaN or Infinity included —
        is an :class:`InvalidSettingError`."""
        try:
            # serialize's rule for keys given twice (json.loads would keep the last width of a layer named
            # twice); NaN and Infinity parse, for the bits rule to name the value it refuses.
            data = json.loads(text, object_pairs_hook=unique_keys)
        except (TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            detail = " ".join(str(exc).split())[:120]
            if type(exc) is ValueError:  # the repeated key, not a syntax or encoding error
                raise InvalidSettingError(
                    f"a bit plan must name each entry and layer once: {detail}; keep one of them"
                ) from None
            raise InvalidSettingError(
                f"a bit plan must be JSON text such as BitPlan.to_json() writes ({detail})"
            ) from None
        return cls.from_document(data)

    @classmethod
    def from_document(cls, data: Any) -> BitPlan:
        """The plan in a parsed JSON document: ``{"weights": {layer: bits}, "activations": {layer: bits}}``."""
        if not isinstance(data, dict):
            raise InvalidSettingError(
                f'a bit plan must be a JSON object {{"weights": {{layer: bits}}, "activations": {{layer: '
                f"bits}}}}, got a {type(data).__name__}"
            )
        unknown = sorted(set(data) - {"weights", "activations", "activation_ranges"})
        if unknown:
            raise InvalidSettingError(
                f"a bit plan has the entries weights and activations, got also {unknown[:5]}; remove them"
            )
        for kind in ("weights", "activations"):
            if not isinstance(data.get(kind, {}), dict):
                raise InvalidSettingError(
                    f'a bit plan\'s "{kind}" must map layer names to bits, got {data[kind]!r:.80}'
                )
        return cls(data.get("weights", {}), data.get("activations", {}))

    @property
    def layers(self) -> list[str]:
        """Every layer the plan names (its weights, its inputs or both), sorted."""
        return sorted(set(self.weights) | set(self.activations))

    def check_layers(self, known: Collection[str]) -> None:
        """Refuse a plan naming a layer outside ``known`` (a misspelt name would silently stay at full
        precision, its costs and accuracy those of an unquantized layer)."""
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            near = close_names(unknown[0], known)
            hint = f"did you mean {', '.join(map(repr, near))}? " if near else ""
            raise InvalidSettingError(
                f"the bit plan names layers the model does not have: {unknown[:5]}; {hint}name convolutions and "
                f"linear layers by their qualified module names, e.g. {list(known)[:4]}"
            )


def check_plan(plan: BitPlan, model: nn.Module) -> None:
    """Refuse a plan that does not fit ``model``: a layer it does not have, or one that is not a convolution
    or linear layer (only those are quantized)."""
    if not isinstance(plan, BitPlan):
        raise InvalidSettingError(f"plan must be a BitPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    quantizable = quantizable_layers(model)
    plan.check_layers(dict.fromkeys([*quantizable, *(n for n in modules if n)]))  # quantizable ones first
    other = [name for name in plan.layers if not isinstance(modules[name], QUANTIZABLE)]
    if other:
        raise InvalidSettingError(
            f"{other[0]!r} is a {type(modules[other[0]]).__name__}; only convolutions and linear layers are "
            f"quantized: remove it from the bit plan (quantizable layers: {quantizable[:4]} ...)"
        )


def quantizable_layers(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s convolutions and linear layers, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE) and name]


def group_layers(graph: DependencyGraph, model: nn.Module) -> list[tuple[str, ...]]:
    """Per channel group, the quantizable layers whose output channels it prunes: the layers whose bits a
    per-group choice sets (a layer producing no group's channels belongs to none)."""
    quantizable = set(quantizable_layers(model))
    return [
        tuple(dict.fromkeys(m.layer for m in g.members if m.kind == "out" and m.layer in quantizable))
        for g in graph.groups
    ]


def plan_for_groups(
    graph: DependencyGraph,
    model: nn.Module,
    weight_bits: Sequence[int],
    activation_bits: Sequence[int],
    other_bits: int = 8,
) -> BitPlan:
    """The plan giving each group's layers that group's bits, and every other quantizable layer
    ``other_bits`` (weights and activations)."""
    return plan_from_groups(
        group_layers(graph, model), quantizable_layers(model), weight_bits, activation_bits, other_bits
    )


def plan_from_groups(
    layers_of_groups: Sequence[Sequence[str]],
    layers: Sequence[str],
    weight_bits: Sequence[int] | np.ndarray,
    activation_bits: Sequence[int] | np.ndarray,
    other_bits: int = 8,
) -> BitPlan:
    """:func:`plan_for_groups` from the groups' layers (:func:`group_layers`) and every quantizable layer."""
    if len(weight_bits) != len(layers_of_groups) or len(activation_bits) != len(layers_of_groups):
        raise InvalidSettingError(
            f"expected {len(layers_of_groups)} weight and activation bit-widths (one per group), got "
            f"{len(weight_bits)} and {len(activation_bits)}"
        )
    weights = dict.fromkeys(layers, other_bits)
    activations = dict(weights)
    for names, w, a in zip(layers_of_groups, weight_bits, activation_bits, strict=True):
        for name in names:
            weights[name], activations[name] = int(w), int(a)
    return BitPlan(weights, activations)
