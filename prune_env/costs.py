"""Costs of a (pruned) model: analytic from the dependency graph, and measured.

MACs are multiply-accumulates of convolutions and matrix products; FLOPs = 2 × MACs. We say MACs.
The analytic model is exact because every cost we model is *bilinear* in kept channel counts: a
convolution's MACs are ``coef × kept_in × kept_out`` (``coef`` = batch × output pixels × kernel area,
calibrated per call from PyTorch's own FLOP counter), a depthwise one's ``coef × kept_out``, a parameter's
numel ``coef × kept(dim0) × kept(dim1)``. Kept counts are linear in the units kept per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class CostTerm:
    """``coef × Π kept(slot)`` over at most two slots (a layer dimension)."""

    coef: int
    slots: tuple[int, ...]


class CostModel:
    """Exact MACs and parameter counts as functions of the units kept per group.

    ``kept(slot) = fixed[slot] + mult[slot] @ keep`` where ``mult[slot, g]`` is how many indices of the slot
    one unit of group ``g`` occupies.
    """

    def __init__(
        self,
        mult: np.ndarray,
        fixed: np.ndarray,
        macs_terms: Sequence[CostTerm],
        params_terms: Sequence[CostTerm],
        full: Sequence[int],
    ) -> None:
        self.mult = mult
        self.fixed = fixed
        self.n_groups = mult.shape[1]
        self.full = np.asarray(full, dtype=np.int64)  # units per group, unpruned
        self._macs = self._compile(macs_terms)
        self._params = self._compile(params_terms)
        # int64 arithmetic is exact when no partial sum can exceed the largest possible total (all kept
        # counts at most the unpruned ones): then evaluate vectorised, else term by term in Python ints.
        self._kept_full = self.kept(self.full)
        self._int64_exact = all(
            self._python_sum(compiled, self._kept_full, absolute=True) < 2**62
            for compiled in (self._macs, self._params)
        )

    def _compile(self, terms: Sequence[CostTerm]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if any(len(t.slots) > 2 for t in terms):
            raise ValueError("cost terms are at most bilinear")
        one = len(self.fixed)  # index of a virtual slot whose kept count is always 1
        coef = np.array([t.coef for t in terms], dtype=np.int64)
        s1 = np.array([t.slots[0] if len(t.slots) > 0 else one for t in terms], dtype=np.int64)
        s2 = np.array([t.slots[1] if len(t.slots) > 1 else one for t in terms], dtype=np.int64)
        return coef, s1, s2

    def compiled_terms(self, metric: str = "macs") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(coef, slot1, slot2)`` arrays of the ``"macs"`` or ``"params"`` terms; slot index
        ``len(fixed)`` is the constant 1. For differentiable re-implementations (SeerNet's barrier)."""
        if metric not in ("macs", "params"):
            raise ValueError(f"metric must be 'macs' or 'params', got {metric!r}")
        return self._macs if metric == "macs" else self._params

    def full_keep(self) -> np.ndarray:
        return self.full.copy()

    def kept(self, keep: np.ndarray) -> np.ndarray:
        """Kept indices per slot (plus a trailing constant 1) for ``keep`` units per group."""
        k = self.fixed + self.mult @ np.asarray(keep, dtype=np.int64)
        return np.append(k, 1)

    def _eval(self, compiled: tuple[np.ndarray, np.ndarray, np.ndarray], keep: np.ndarray) -> int:
        k = self.kept(keep)
        if self._int64_exact and np.all((k >= 0) & (k <= self._kept_full)):
            coef, s1, s2 = compiled
            return int(coef @ (k[s1] * k[s2]))
        return self._python_sum(compiled, k)

    @staticmethod
    def _python_sum(
        compiled: tuple[np.ndarray, np.ndarray, np.ndarray], k: np.ndarray, absolute: bool = False
    ) -> int:
        """The cost in Python integers: exact, and no int64 overflow for very large models."""
        coef, s1, s2 = compiled
        f = abs if absolute else int
        return int(sum(f(int(c)) * f(int(a)) * f(int(b)) for c, a, b in zip(coef, k[s1], k[s2], strict=True)))

    def macs(self, keep: np.ndarray) -> int:
        return self._eval(self._macs, keep)

    def params(self, keep: np.ndarray) -> int:
        return self._eval(self._params, keep)

    def macs_batch(self, keeps: np.ndarray) -> np.ndarray:
        """MACs for many keep vectors at once (rows), as float64 — for searches and budget projection."""
        return self._eval_batch(self._macs, keeps)

    def params_batch(self, keeps: np.ndarray) -> np.ndarray:
        return self._eval_batch(self._params, keeps)

    def _eval_batch(
        self, compiled: tuple[np.ndarray, np.ndarray, np.ndarray], keeps: np.ndarray
    ) -> np.ndarray:
        coef, s1, s2 = compiled
        keeps = np.atleast_2d(np.asarray(keeps, dtype=np.float64))
        k = self.fixed[None, :] + keeps @ self.mult.T.astype(np.float64)
        k = np.concatenate([k, np.ones((k.shape[0], 1))], axis=1)
        return (k[:, s1] * k[:, s2]) @ coef.astype(np.float64)


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def count_macs(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Measured MACs of one forward pass: half the FLOPs PyTorch's ``FlopCounterMode`` counts.

    Runs the model in eval mode under ``torch.no_grad`` (so nothing is updated) and restores its modes.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*_as_tuple(example_inputs))
    finally:
        for m, flag in modes.items():
            m.training = flag
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
