"""The user's own evaluation as the proxy: any function from a model to a score.

A detector is judged by mAP on the user's validation set, a segmenter by mIoU, a model in production by a
business metric: :class:`MetricProxy` scores every candidate with the function the user gives, after the
same BatchNorm recalibration the library's own proxy applies (on batches the user gives), so a search
optimises what the user measures. The score is checked on every call: a metric that returns something
other than a finite real number inside the range it declared is a bug the search must not learn from.

The environments' rewards read a proxy's ``accuracy``, a fraction where 1 is best; the metric's score is
mapped onto it linearly from its declared ``worst`` and ``best`` values (``worst=1, best=0`` for an error
rate, where lower is better).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from prune_env.device import on_device, resolve_device, seed_generators, to_device
from prune_env.errors import InvalidSettingError, MetricError
from prune_env.proxy import Proxy, ProxyResult, recalibrate_batchnorm, set_eval
from prune_env.validation import check_settings

Metric = Callable[[nn.Module], float]


def _finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


class MetricProxy(Proxy):
    """Scores a candidate with the user's ``metric(model) -> float``, after BatchNorm recalibration.

    Args:
        metric: called with the candidate in eval mode, on ``device``, under ``torch.inference_mode``;
            returns its score on the user's validation data (never the test split). It must not keep the
            model: each candidate is handed over and discarded after the call.
        worst: the metric's worst possible value (0 for an accuracy or mAP, 1 for an error rate).
        best: its best possible value (1 for an accuracy or mAP, 0 for an error rate). Every score must lie
            between the two; ``accuracy`` of the result is ``(score - worst) / (best - worst)``.
        recalibration_batches: inputs (each passed to the model as it is: a tensor, or a list of images
            for a torchvision detector) on which BatchNorm statistics are re-estimated before scoring, as
            EagleEye's adaptive BatchNorm does; empty for none. Read once, here.
        seed: seeds the random generators before recalibration and scoring, so equal candidates score
            equally (dropout, a metric that samples).
        device: where candidates are moved before scoring (default: CUDA when present, else CPU).

    The result's ``loss`` is ``1 - accuracy`` (the score's shortfall from ``best``, as a fraction) and
    ``kl_to_teacher`` is ``None``: the metric is all this proxy knows.
    """

    def __init__(
        self,
        metric: Metric,
        *,
        worst: float = 0.0,
        best: float = 1.0,
        recalibration_batches: Iterable[Any] = (),
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if not callable(metric):
            raise InvalidSettingError(
                f"metric must be a function model -> score, got {type(metric).__name__}: pass the function "
                "itself, not its result"
            )
        for name, value in (("worst", worst), ("best", best)):
            if not _finite_real(value):
                raise InvalidSettingError(f"{name} must be a finite real number, got {value!r}")
        if float(worst) == float(best):
            raise InvalidSettingError(
                f"worst and best are both {worst!r}: give the metric's worst and best values, which differ "
                "(worst=0, best=1 for an accuracy; worst=1, best=0 for an error rate)"
            )
        if isinstance(recalibration_batches, (torch.Tensor, str, bytes)):
            raise InvalidSettingError(
                "recalibration_batches must be a sequence of batches, got a single "
                f"{type(recalibration_batches).__name__}: wrap it in a list ([batch])"
            )
        check_settings({"seed": seed})
        self.keeps_models = False
        self.metric = metric
        self.worst, self.best = float(worst), float(best)
        self.seed = seed
        self.device = resolve_device(device)
        self.recalibration_batches = [to_device(b, self.device) for b in recalibration_batches]

    def score(self, value: Any) -> float:
        """``value`` (what the metric returned) as a fraction where 1 is ``best``; refuses anything else."""
        name = getattr(self.metric, "__name__", type(self.metric).__name__)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if not _finite_real(value):
            raise MetricError(
                f"the metric {name!r} returned {value!r} ({type(value).__name__}): it must return a finite "
                "real number (a float, or a one-element tensor)"
            )
        low, high = sorted((self.worst, self.best))
        if not low <= float(value) <= high:
            raise MetricError(
                f"the metric {name!r} returned {float(value)!r}, outside its declared range "
                f"[{low!r}, {high!r}] (worst={self.worst!r}, best={self.best!r}): fix the metric, or declare "
                "the range it really has"
            )
        return (float(value) - self.worst) / (self.best - self.worst)

    def evaluate(self, model: nn.Module) -> ProxyResult:
        return self.evaluate_owned(copy.deepcopy(model))

    def evaluate_owned(self, model: nn.Module) -> ProxyResult:
        start = time.perf_counter()
        with self._seeded():
            candidate = self._adapt(model)
            with torch.inference_mode():
                value = self.metric(candidate)
        accuracy = self.score(value)
        return ProxyResult(accuracy=accuracy, loss=1.0 - accuracy, seconds=time.perf_counter() - start)

    def prepare(self, model: nn.Module) -> nn.Module:
        with self._seeded():
            return self._adapt(copy.deepcopy(model))

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """Random generators seeded alike for every candidate, and restored afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            seed_generators(self.seed, self.device)
            yield

    def _adapt(self, candidate: nn.Module) -> nn.Module:
        """``candidate`` on this proxy's device, BatchNorm recalibrated, in eval mode (in place)."""
        if not on_device(candidate, self.device):
            candidate.to(self.device)
        modules = list(candidate.modules())
        recalibrate_batchnorm(candidate, self.recalibration_batches, modules)
        set_eval(modules)
        return candidate
