"""Scoring with simulated quantization, composed with any proxy.

:class:`QuantizedScoring` lets the proxy prepare the pruned model as it always does (BatchNorm
recalibration, distillation steps, a supernet's trained sub-network: ``Proxy.prepare_policy``), then
quantizes that model as a :class:`~prune_env.quantization.bits.BitPlan` says and measures it on the proxy's
validation subset without touching it again — quantization is applied to the weights the proxy would
have scored, as a model is deployed after its last update. :class:`QuantizedProxy` is a
:class:`~prune_env.proxy.Proxy` that does this with one plan for every policy (e.g. 8 bits everywhere).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from prune_env.proxy import Proxy, ProxyContext, ProxyEvaluator, ProxyResult
from prune_env.quantization.bits import BitPlan
from prune_env.quantization.fakequant import calibration_batches, fake_quantize

CALIBRATION_BATCHES = 4


class QuantizedScoring:
    """Scores pruning policies quantized by a bit plan, after ``proxy`` has prepared them.

    The measurement uses the validation subset every proxy of ``context`` uses (same size, same seed);
    activation ranges are observed on ``calibration`` fixed, seeded training batches.
    """

    def __init__(self, proxy: Proxy, context: ProxyContext, calibration: int = CALIBRATION_BATCHES) -> None:
        s = context.settings
        self.proxy = proxy
        self.measure = ProxyEvaluator(
            context.base_model,
            context.data,
            eval_samples=s.eval_samples,
            bn_recalib_batches=0,
            finetune_steps=0,
            seed=s.seed,
            device=context.device,
        )
        self.batches = calibration_batches(context.data.train, calibration, seed=s.seed)

    def prepare(self, keep: np.ndarray, plan: BitPlan, build: Callable[[], nn.Module]) -> nn.Module:
        """The pruned model as the proxy prepares it, then quantized (what :meth:`evaluate` measures)."""
        return fake_quantize(self.proxy.prepare_policy(keep, build), plan, self.batches)

    def evaluate(self, keep: np.ndarray, plan: BitPlan, build: Callable[[], nn.Module]) -> ProxyResult:
        return self.measure.evaluate_owned(self.prepare(keep, plan, build))


class QuantizedProxy(Proxy):
    """A proxy scoring every policy quantized by one ``plan`` (see :class:`QuantizedScoring`)."""

    def __init__(
        self, proxy: Proxy, context: ProxyContext, plan: BitPlan, calibration: int = CALIBRATION_BATCHES
    ):
        self.scoring = QuantizedScoring(proxy, context, calibration)
        self.plan = plan
        self.keeps_models = proxy.keeps_models

    def evaluate(self, model: nn.Module) -> ProxyResult:
        return self.scoring.measure.evaluate_owned(
            fake_quantize(self.scoring.proxy.prepare(model), self.plan, self.scoring.batches)
        )

    def evaluate_policy(self, keep: np.ndarray, build: Callable[[], nn.Module]) -> ProxyResult:
        return self.scoring.evaluate(keep, self.plan, build)

    def prepare_policy(self, keep: np.ndarray, build: Callable[[], nn.Module]) -> nn.Module:
        return self.scoring.prepare(keep, self.plan, build)

    def prepare(self, model: nn.Module) -> nn.Module:
        return fake_quantize(self.scoring.proxy.prepare(model), self.plan, self.scoring.batches)
