"""Costs of a pruned and quantized model: BitOps and size, exact and analytic like MACs.

BitOps = Σ over layers of MACs × weight bits × activation bits (a layer left at full precision, and every
multiply-accumulate outside convolutions and linear layers, counts 32 × 32); size = Σ over parameters of
elements × bits (a quantized layer's weight at its bits, everything else — biases, norms — 32-bit). Both
come from the dependency graph's cost terms split by layer (:meth:`~prune_env.costs.CostModel.macs_by_label`),
so they are exact for any kept counts without building the model; :func:`count_bitops` and
:func:`count_size_bits` measure the same on a model, for the tests that hold the two together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from prune_env.costs import CostModel
from prune_env.quantization.bits import FULL_PRECISION, BitPlan, check_plan


def plan_layers_of(costs: CostModel) -> list[str]:
    """The layers a bit plan may name, as the cost model knows them: those with a ``weight`` parameter."""
    return [label.rpartition(".")[0] for label in costs.params_labels if label.endswith(".weight")]


def bitops(costs: CostModel, keep: np.ndarray, plan: BitPlan) -> int:
    """BitOps of the pruned model keeping ``keep`` units per group, quantized as ``plan`` says."""
    plan.check_layers(plan_layers_of(costs))
    return sum(
        macs * plan.weight_bits(layer) * plan.activation_bits(layer)
        for layer, macs in costs.macs_by_label(keep).items()
    )


def _param_bits(name: str, plan: BitPlan) -> int:
    layer, _, attr = name.rpartition(".")
    return plan.weight_bits(layer) if attr == "weight" and layer in plan.weights else FULL_PRECISION


def size_bits(costs: CostModel, keep: np.ndarray, plan: BitPlan) -> int:
    """Bits the parameters of the pruned, quantized model take (÷ 8 for bytes)."""
    plan.check_layers(plan_layers_of(costs))
    return sum(n * _param_bits(name, plan) for name, n in costs.params_by_label(keep).items())


def count_bitops(model: nn.Module, inputs: Sequence[torch.Tensor], plan: BitPlan) -> int:
    """BitOps of ``model`` on ``inputs`` (eval mode) measured with PyTorch's FLOP counter (MACs = FLOPs / 2),
    each layer's MACs read off the counter as the layer runs."""
    check_plan(plan, model)
    from torch.utils.flop_counter import FlopCounterMode

    from prune_env.costs import reference_attention

    macs: dict[str, int] = {}
    counter = FlopCounterMode(display=False)
    hooks = []
    for name, m in model.named_modules():
        if name in plan.weights or name in plan.activations:

            def before(module: nn.Module, args: object, name: str = name) -> None:
                macs[name] = macs.get(name, 0) - counter.get_total_flops() // 2

            def after(module: nn.Module, args: object, out: object, name: str = name) -> None:
                macs[name] += counter.get_total_flops() // 2

            hooks += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), reference_attention(), counter:
            model(*inputs)
        total = counter.get_total_flops() // 2
    finally:
        for h in hooks:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    quantized = sum(m * plan.weight_bits(n) * plan.activation_bits(n) for n, m in macs.items())
    return quantized + (total - sum(macs.values())) * FULL_PRECISION * FULL_PRECISION


def count_size_bits(model: nn.Module, plan: BitPlan) -> int:
    """Bits ``model``'s parameters take when quantized as ``plan`` says (each shared tensor once)."""
    check_plan(plan, model)
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * _param_bits(name, plan)
    return total
