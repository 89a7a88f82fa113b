"""Simulated (fake) quantization for scoring: values rounded to the grid a fixed-point format can hold.

Weights are quantized symmetrically per output channel (scale = the channel's largest magnitude over
``2^(b-1) - 1``); a layer's input activations per tensor, with the range observed on fixed calibration
batches (unsigned when never negative, as after a ReLU, else affine with a zero point). PyTorch's own
``fake_quantize_per_channel_affine`` / ``fake_quantize_per_tensor_affine`` do the rounding, so the result is
what PyTorch's quantized kernels would compute from the same scales. Full-precision layers are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from prune_env.batches import iterate_batches
from prune_env.errors import InvalidSettingError
from prune_env.quantization.bits import FULL_PRECISION, BitPlan, check_bits, check_plan


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` rounded to ``bits``-bit symmetric integers, one scale per output channel (dim 0).

    ``bits``: 2..16, or 32 (full precision: ``weight`` itself), the package's one rule
    (:func:`~prune_env.quantization.bits.check_bits`); one bit would leave no nonzero level (NaN scales)."""
    bits = check_bits("bits", bits)
    if bits == FULL_PRECISION:
        return weight
    qmax = 2 ** (bits - 1) - 1
    peak = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    scale = torch.where(peak > 0, peak / qmax, torch.ones_like(peak)).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -qmax, qmax)


def activation_grid(low: float, high: float, bits: int) -> tuple[float, int, int, int]:
    """``(scale, zero_point, qmin, qmax)`` of a per-tensor format covering ``[low, high]`` (and 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    qmax = 2**bits - 1
    scale = (high - low) / qmax if high > low else 1.0
    zero = min(qmax, max(0, round(-low / scale)))
    return scale, zero, 0, qmax


class ActivationQuantizer:
    """A forward pre-hook rounding a layer's input to a fixed per-tensor grid."""

    def __init__(self, low: float, high: float, bits: int) -> None:
        self.bits = bits
        self.scale, self.zero, self.qmin, self.qmax = activation_grid(low, high, bits)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = torch.fake_quantize_per_tensor_affine(args[0], self.scale, self.zero, self.qmin, self.qmax)
        return (x, *args[1:])


def calibration_batches(
    dataset: object, batches: int, batch_size: int = 64, seed: int = 0
) -> list[torch.Tensor]:
    """``batches`` fixed, seeded training batches (inputs only) to observe activation ranges on."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for x, _ in iterate_batches(dataset, batch_size, shuffle=True, generator=generator):  # type: ignore[arg-type]
        found.append(x)
        if len(found) == batches:
            break
    return found


def observe_ranges(
    model: nn.Module, layers: Iterable[str], batches: Sequence[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """The smallest and largest input value each of ``layers`` sees over ``batches`` (eval mode)."""
    ranges: dict[str, tuple[float, float]] = {}

    def observer(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            low, high = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(observer(n)) for n in layers]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return ranges


def fake_quantize(model: nn.Module, plan: BitPlan, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Quantize ``model`` in place as ``plan`` says (weights rounded, input hooks installed, activation
    ranges observed on ``batches`` first, before any weight is rounded) and return it. The caller owns
    ``model``: copy it first to keep the original."""
    check_plan(plan, model)
    ranges = activation_ranges(model, plan, batches)  # on the weights as they were
    fake_quantize_weights(model, plan)
    install_activation_quantizers(model, plan, ranges)
    return model


def fake_quantize_weights(model: nn.Module, plan: BitPlan) -> None:
    """Round the weights of ``plan``'s layers in place."""
    with torch.no_grad():
        for name, bits in plan.weights.items():
            weight = model.get_parameter(f"{name}.weight")
            weight.copy_(quantize_weight(weight, bits))


def activation_ranges(
    model: nn.Module, plan: BitPlan, batches: Sequence[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """The input ranges :func:`fake_quantize` calibrates for ``plan``'s quantized activations on ``batches``."""
    layers = [n for n, b in plan.activations.items() if b != FULL_PRECISION]
    ranges = observe_ranges(model, layers, batches) if layers else {}
    for name, (low, high) in ranges.items():
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InvalidSettingError(
                f"the inputs of layer {name!r} reach NaN or inf on the calibration batches (range [{low:g}, "
                f"{high:g}]), so no grid covers them; calibrate on finite inputs, with a model whose weights "
                "are finite"
            )
    return ranges


def install_activation_quantizers(
    model: nn.Module, plan: BitPlan, ranges: dict[str, tuple[float, float]]
) -> None:
    """Round the inputs of ``plan``'s quantized layers to the grids of ``ranges`` (layer -> (low, high))."""
    for name, bits in plan.activations.items():
        if bits != FULL_PRECISION:
            low, high = ranges.get(name, (0.0, 0.0))  # a layer the batches never reach: any grid will do
            model.get_submodule(name).register_forward_pre_hook(ActivationQuantizer(low, high, bits))
