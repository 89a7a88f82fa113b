"""Mixed-precision quantization next to pruning: bit plans, simulated quantization for scoring, and the
exact BitOps and size of a pruned, quantized model (SeerNet and HAQ search such joint policies).

- :mod:`~prune_env.quantization.bits`: :class:`BitPlan` (bits per layer), the layers a group's choice sets;
- :mod:`~prune_env.quantization.fakequant`: per-channel symmetric weights, per-tensor calibrated activations;
- :mod:`~prune_env.quantization.costs`: analytic BitOps and size from the dependency graph, and counted ones;
- :mod:`~prune_env.quantization.proxy`: scoring quantized models after any proxy has prepared them;
- :mod:`~prune_env.quantization.export`: PyTorch int8 models, or the fake-quantized model and its plan.
"""

from prune_env.quantization.bits import (
    BIT_CHOICES,
    FULL_PRECISION,
    BitPlan,
    group_layers,
    plan_for_groups,
    quantizable_layers,
)
from prune_env.quantization.costs import bitops, count_bitops, count_size_bits, size_bits
from prune_env.quantization.export import load_fake_quantized, save_fake_quantized, to_int8
from prune_env.quantization.fakequant import calibration_batches, fake_quantize, quantize_weight
from prune_env.quantization.proxy import QuantizedProxy, QuantizedScoring

__all__ = [
    "BIT_CHOICES",
    "FULL_PRECISION",
    "BitPlan",
    "QuantizedProxy",
    "QuantizedScoring",
    "bitops",
    "calibration_batches",
    "count_bitops",
    "count_size_bits",
    "fake_quantize",
    "group_layers",
    "load_fake_quantized",
    "plan_for_groups",
    "quantizable_layers",
    "quantize_weight",
    "save_fake_quantized",
    "size_bits",
    "to_int8",
]
