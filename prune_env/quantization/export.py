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
import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_env.errors import CheckpointError, InvalidSettingError
from prune_env.fileio import write_bytes_atomic, write_text_atomic
from prune_env.quantization.bits import FULL_PRECISION, BitPlan, check_plan
from prune_env.quantization.fakequant import (
    activation_ranges,
    fake_quantize_weights,
    install_activation_quantizers,
)
from prune_env.serialize import loads_strict
from prune_env.trusted_files import read_weights

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

    check_plan(plan, model)
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
    check_plan(plan, model)
    out = Path(directory)
    targets = [out / "model.pt", out / "bit_plan.json"]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise InvalidSettingError(f"{', '.join(existing)} already exist; choose another directory")
    quantized = copy.deepcopy(model).eval()
    ranges = activation_ranges(quantized, plan, batches)
    fake_quantize_weights(quantized, plan)
    out.mkdir(parents=True, exist_ok=True)
    weights = io.BytesIO()
    torch.save(quantized.state_dict(), weights)
    # Never replaces a file another process wrote meanwhile (the check above is only the early answer):
    # of two saves racing into one directory, the first to publish model.pt writes the plan, the other stops.
    try:
        write_bytes_atomic(targets[0], weights.getvalue(), replace=False)
    except FileExistsError:
        raise InvalidSettingError(
            f"{out} already holds a saved model: another save wrote {targets[0].name} there meanwhile; "
            "choose another directory"
        ) from None
    # Every quantized layer's range, a layer the batches never reach included (its grid is install's
    # default), so that a loader can tell a complete file from one missing a range.
    saved_ranges = {n: list(ranges.get(n, (0.0, 0.0))) for n in _quantized_inputs(plan)}
    document = {**json.loads(plan.to_json()), "activation_ranges": saved_ranges}
    write_text_atomic(targets[1], json.dumps(document, indent=1))
    return out


def load_fake_quantized(model: nn.Module, directory: str | Path) -> tuple[nn.Module, BitPlan]:
    """``model`` (the same architecture, e.g. the pruned model as saved) with the weights and activation
    grids :func:`save_fake_quantized` wrote, and the plan; ``model`` itself is loaded into.

    Every file is checked before ``model`` is touched: a plan or activation ranges that are not what
    :func:`save_fake_quantized` writes, or weights that do not fit ``model``, are a :class:`CheckpointError`
    naming the file."""
    out = Path(directory)
    plan_file, weights = out / "bit_plan.json", out / "model.pt"
    document = _read_json(plan_file)
    try:
        plan = BitPlan.from_document(document)
        check_plan(plan, model)
    except InvalidSettingError as exc:
        raise CheckpointError(
            f"{plan_file}: {exc} (pass the model save_fake_quantized was given, or re-save it)"
        ) from None
    ranges = _activation_ranges(document, plan, plan_file)
    state = read_weights(weights)
    expected = model.state_dict()
    misfit = sorted(set(expected) ^ set(state)) or [
        k for k in expected if (state[k].shape, state[k].dtype) != (expected[k].shape, expected[k].dtype)
    ]
    if misfit:
        k = misfit[0]
        detail = (
            f"{k!r} is {tuple(state[k].shape)} {state[k].dtype} there, {tuple(expected[k].shape)} "
            f"{expected[k].dtype} in the model"
            if k in state and k in expected
            else f"{k!r} is only in {'the file' if k in state else 'the model'}"
        )
        raise CheckpointError(
            f"weights in {weights} do not fit this model ({detail}); pass the model save_fake_quantized "
            "was given (the same pruned architecture and dtype)"
        )
    model.load_state_dict(state)
    install_activation_quantizers(model, plan, ranges)
    return model.eval(), plan


def _read_json(path: Path) -> Any:
    """The JSON document in ``path``, or :class:`CheckpointError` saying why there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: not a directory save_fake_quantized wrote (it holds bit_plan.json and "
            "model.pt)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return loads_strict(raw)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; not a bit plan") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]}); re-save the model with "
            "save_fake_quantized"
        ) from None


def _quantized_inputs(plan: BitPlan) -> list[str]:
    """The layers whose inputs ``plan`` quantizes (a saved file holds a range for each), sorted."""
    return sorted(name for name, bits in plan.activations.items() if bits != FULL_PRECISION)


def _activation_ranges(document: dict[str, Any], plan: BitPlan, path: Path) -> dict[str, tuple[float, float]]:
    """The saved ``[low, high]`` input range of each layer whose inputs ``plan`` quantizes: finite numbers
    with ``low <= high`` (a grid over an inverted or infinite range would round every input to one
    value, or to NaN)."""
    raw = document.get("activation_ranges", {})
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path}: activation_ranges must map layer names to [low, high], got {raw!r:.80}; re-save the "
            "model with save_fake_quantized"
        )
    quantized = _quantized_inputs(plan)
    missing = [name for name in quantized if name not in raw]
    if missing:
        # Without its range a layer's inputs would be rounded to the default grid (the whole numbers from 0),
        # not the calibrated one: the model would compute something else than what was scored, silently.
        raise CheckpointError(
            f"{path}: activation_ranges has no range for {missing[0]!r}"
            + (f" (and {len(missing) - 1} more layers)" if len(missing) > 1 else "")
            + f", whose inputs the plan quantizes to {plan.activation_bits(missing[0])} bits; the file was "
            "edited or is incomplete: re-save the model with save_fake_quantized"
        )
    ranges: dict[str, tuple[float, float]] = {}
    for name, value in raw.items():
        if name not in quantized:
            raise CheckpointError(
                f"{path}: activation_ranges has a range for {name!r}, whose inputs the plan does not "
                "quantize; the file was edited or mixes two saves: re-save the model with save_fake_quantized"
            )
        numbers = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        if not numbers:
            raise CheckpointError(
                f"{path}: the activation range of {name!r} must be two numbers [low, high], got "
                f"{value!r:.80}; re-save the model with save_fake_quantized"
            )
        low, high = float(value[0]), float(value[1])
        finite = math.isfinite(low) and math.isfinite(high)
        if not finite or low > high:
            problem = "is inverted (low > high)" if finite else "is not finite"
            raise CheckpointError(
                f"{path}: the activation range of {name!r}, [{low:g}, {high:g}], {problem}; ranges are the "
                "smallest and largest input observed: re-save the model with save_fake_quantized"
            )
        ranges[name] = (low, high)
    return ranges
