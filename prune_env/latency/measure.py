"""The measurement protocol: how long one call of a callable takes on a device.

Warm-up calls first (allocator, caches, oneDNN primitive creation, CUDA lazy loading), then ``repeats``
timed samples, each running the callable ``number`` times (enough to last ``min_sample_ms``), under
``torch.inference_mode()`` and, on the CPU, at a fixed intra-op thread count restored afterwards. CUDA work
is asynchronous: it is timed with ``torch.cuda.Event`` pairs and synchronised, never with the host clock.

A sample is disturbed when something else ran on the machine meanwhile; the median ignores a few such
samples, the interquartile range (IQR) shows them. A measurement whose IQR exceeds ``noise_bound`` of its
median is measured again, at most ``max_attempts`` times; if it is still noisy it is *flagged*
(:attr:`Timing.noisy`) and every table and report built from it says so -- never written as clean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from time import perf_counter_ns

import numpy as np
import torch
from torch import nn

from prune_env.latency.settings import LatencySettings

# A sample never runs the callable more often than this, however fast it is (bounds a mis-calibration).
MAX_CALLS_PER_SAMPLE = 10_000


@dataclass(frozen=True)
class Timing:
    """One measurement: milliseconds per call.

    Attributes:
        median_ms: median over the samples (what tables and predictions use).
        min_ms: the fastest sample (the least disturbed).
        iqr_ms: interquartile range of the samples (their spread).
        repeats: timed samples.
        number: calls per sample.
        attempts: measurements made before this one was kept (> 1: earlier ones were too noisy).
        noisy: the IQR still exceeded the bound after every attempt: treat the median with suspicion.
    """

    median_ms: float
    min_ms: float
    iqr_ms: float
    repeats: int
    number: int = 1
    attempts: int = 1
    noisy: bool = False

    @property
    def relative_iqr(self) -> float:
        """IQR / median (0 for a zero median: nothing to be unsure about)."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], number: int = 1, attempts: int = 1) -> Timing:
        a = np.asarray(samples_ms, dtype=np.float64)
        q1, median, q3 = np.percentile(a, [25, 50, 75])
        return cls(float(median), float(a.min()), float(q3 - q1), len(a), number, attempts)


@dataclass(frozen=True)
class NoiseEstimate:
    """How far the protocol's medians move between identical measurements on this machine, now.

    Attributes:
        medians_ms: the median of each repeated measurement.
        relative_spread: (largest - smallest median) / median of the medians.
    """

    medians_ms: tuple[float, ...]
    relative_spread: float

    def distinguishes(self, a_ms: float, b_ms: float) -> bool:
        """Whether two medians differ by more than the protocol's own noise (relative to the larger one):
        a smaller difference may be the machine, not the model."""
        larger = max(abs(a_ms), abs(b_ms))
        return larger > 0 and abs(a_ms - b_ms) / larger > self.relative_spread


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, the caller's count restored after (even on error)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _elapsed_ms(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Milliseconds per call of ``number`` back-to-back calls."""
    if device.type == "cuda":
        # Kernels are queued, not run, when fn returns: time on the GPU's own clock between two events,
        # after the work queued before them has finished.
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / number
    t0 = perf_counter_ns()
    for _ in range(number):
        fn()
    return (perf_counter_ns() - t0) / 1e6 / number


def _calls_per_sample(fn: Callable[[], object], settings: LatencySettings, device: torch.device) -> int:
    if settings.min_sample_ms <= 0:
        return 1
    once = max(_elapsed_ms(fn, 1, device), 1e-6)
    return int(min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(settings.min_sample_ms / once))))


def _measure_once(fn: Callable[[], object], settings: LatencySettings, attempt: int) -> Timing:
    device = settings.torch_device
    for _ in range(settings.warmup):
        fn()
    number = _calls_per_sample(fn, settings, device)
    samples = [_elapsed_ms(fn, number, device) for _ in range(settings.repeats)]
    return Timing.from_samples(samples, number, attempt)


def measure_callable(fn: Callable[[], object], settings: LatencySettings) -> Timing:
    """Time ``fn()`` (which runs work on ``settings.device``) by the protocol in this module's docstring.

    A measurement noisier than ``settings.noise_bound`` is repeated up to ``settings.max_attempts`` times;
    the quietest is returned, flagged :attr:`Timing.noisy` if even that one exceeds the bound.
    """
    best: Timing | None = None
    with thread_count(settings.threads), torch.inference_mode():
        for attempt in range(1, settings.max_attempts + 1):
            timing = _measure_once(fn, settings, attempt)
            if timing.relative_iqr <= settings.noise_bound:
                return timing
            if best is None or timing.relative_iqr < best.relative_iqr:
                best = timing
    assert best is not None  # max_attempts >= 1
    return replace(best, attempts=settings.max_attempts, noisy=True)


def estimate_noise(fn: Callable[[], object], settings: LatencySettings, rounds: int = 3) -> NoiseEstimate:
    """Measure ``fn`` ``rounds`` times and report how much the medians move: the protocol's own noise on
    this machine under its current load (what later comparisons must exceed to mean anything)."""
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 to see a spread, got {rounds}")
    medians = tuple(measure_callable(fn, settings).median_ms for _ in range(rounds))
    centre = float(np.median(medians))
    spread = (max(medians) - min(medians)) / centre if centre > 0 else 0.0
    return NoiseEstimate(medians, float(spread))


def batched(example_inputs: torch.Tensor | Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The first sample of each example input, repeated to ``batch`` samples (contiguous, not a view: a
    broadcast view would let kernels read one sample's memory ``batch`` times, faster than real data)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(x[:1].repeat(batch, *([1] * (x.dim() - 1))).contiguous() for x in inputs)


def module_forward(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], settings: LatencySettings
) -> Callable[[], object]:
    """A call of ``model`` (moved to ``settings.device``, in eval mode) on ``example_inputs`` at the settings'
    batch. The caller's model is not moved or switched to eval: a copy is, when it must be."""
    device = settings.torch_device
    first = next(model.parameters(), None)
    if model.training or (first is not None and first.device != device):
        import copy

        model = copy.deepcopy(model).to(device).eval()
    inputs = tuple(x.to(device) for x in batched(example_inputs, settings.batch))
    return lambda: model(*inputs)


def measure_module(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], settings: LatencySettings
) -> Timing:
    """Milliseconds of one forward pass of ``model`` at ``settings.batch`` on ``settings.device``."""
    return measure_callable(module_forward(model, example_inputs, settings), settings)


__all__ = [
    "NoiseEstimate",
    "Timing",
    "batched",
    "estimate_noise",
    "measure_callable",
    "measure_module",
    "module_forward",
    "thread_count",
]
