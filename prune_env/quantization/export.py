"""Deployable quantized models: PyTorch's own int8 kernels where the plan allows, else fake-quant + plan.

PyTorch's CPU backends (x86, fbgemm, qnnpack) run 8-bit weights and activations. :func:`to_int8` converts
the layers a plan puts at 8 bits (weights and inputs) with PyTorch's FX graph-mode quantization, calibrated
on the given batches, and leaves the others in floating point; a plan asking for other bit-widths has no
kernel to run on, and :func:`to_int8` refuses it — :func:`save_fake_quantized` then keeps what the search
scored: the fake-quantized model and its plan as JSON, to reload and run (or hand to a toolchain with
kernels for those widths).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prune_env.errors import InvalidSettingError
from prune_env.fileio import write_text_atomic
from prune_env.quantization.bits import FULL_PRECISION, BitPlan
from prune_env.quantization.fakequant import (
    activation_ranges,
    fake_quantize_weights,
    install_activation_quantizers,
)

INT8 = 8


def int8_layers(plan: BitPlan) -> list[str]:
    """The layers ``plan`` puts at 8 bits; refuses a plan with any other fixed-point width (no kernel)."""
    layers = sorted(set(plan.weights) | set(plan.activations))
    other = [
        f"{n} (weights {plan.weight_bits(n)}, inputs {plan.activation_bits(n)})"
        for n in layers
        if {plan.weight_bits(n), plan.activation_bits(n)} - {INT8, FULL_PRECISION}
        or plan.weight_bits(n) != plan.activation_bits(n)
    ]
    if other:
        raise InvalidSettingError(
            f"PyTorch's quantized kernels run 8-bit weights with 8-bit inputs only; the plan has {', '.join(other[:4])}"
            + (" ..." if len(other) > 4 else "")
            + ": save the fake-quantized model and its plan instead (save_fake_quantized)"
        )
    return [n for n in layers if plan.weight_bits(n) == INT8]


def to_int8(
    model: nn.Module, plan: BitPlan, batches: Sequence[torch.Tensor], example_inputs: Sequence[torch.Tensor]
) -> nn.Module:
    """A copy of ``model`` (eval mode) whose 8-bit layers run on PyTorch's int8 kernels (x86 backend),
    calibrated on ``batches``; ``model`` is not modified. Operations between them (norms, activations,
    additions) run in int8 too; convolutions and linear layers the plan leaves at full precision do not."""
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from prune_env.quantization.bits import quantizable_layers

    layers = set(int8_layers(plan))
    # int8 by default (norms, activations and additions between 8-bit layers stay in int8, as a backend
    # runs them), floating point for the convolutions and linear layers the plan does not put at 8 bits.
    mapping = QConfigMapping().set_global(get_default_qconfig("x86"))
    for name in quantizable_layers(model):
        if name not in layers:
            mapping = mapping.set_module_name(name, None)
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; it is still PyTorch's own int8 flow.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, tuple(example_inputs))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared)


def save_fake_quantized(
    model: nn.Module, plan: BitPlan, batches: Sequence[torch.Tensor], directory: str | Path
) -> Path:
    """Write ``model`` fake-quantized as ``plan`` says (activation ranges calibrated on ``batches``) to
    ``directory``: ``model.pt`` (the rounded weights, a state_dict) and ``bit_plan.json`` (the plan and the
    activation ranges). ``model`` is not modified; existing files are never overwritten.
    :func:`load_fake_quantized` rebuilds it."""
    out = Path(directory)
    targets = [out / "model.pt", out / "bit_plan.json"]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise InvalidSettingError(f"{', '.join(existing)} already exist; choose another directory")
    quantized = copy.deepcopy(model).eval()
    ranges = activation_ranges(quantized, plan, batches)
    fake_quantize_weights(quantized, plan)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(quantized.state_dict(), targets[0])
    document = {**json.loads(plan.to_json()), "activation_ranges": {k: list(v) for k, v in ranges.items()}}
    write_text_atomic(targets[1], json.dumps(document, indent=1))
    return out


def load_fake_quantized(model: nn.Module, directory: str | Path) -> tuple[nn.Module, BitPlan]:
    """``model`` (the same architecture, e.g. the pruned model as saved) with the weights and activation
    grids :func:`save_fake_quantized` wrote, and the plan; ``model`` itself is loaded into."""
    out = Path(directory)
    document = json.loads((out / "bit_plan.json").read_text())
    plan = BitPlan(document.get("weights", {}), document.get("activations", {}))
    model.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    ranges = {k: (float(v[0]), float(v[1])) for k, v in document.get("activation_ranges", {}).items()}
    install_activation_quantizers(model, plan, ranges)
    return model.eval(), plan
