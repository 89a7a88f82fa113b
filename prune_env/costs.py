"""Costs of a (pruned) model: analytic from the dependency graph, and measured.

MACs are multiply-accumulates of convolutions and matrix products; FLOPs = 2 × MACs. We say MACs.
The analytic model is exact because every cost we model is *bilinear* in kept channel counts: a
convolution's MACs are ``coef × kept_in × kept_out`` (``coef`` = batch × output pixels × kernel area,
calibrated per call from PyTorch's own FLOP counter), a depthwise one's ``coef × kept_out``, a parameter's
numel ``coef × kept(dim0) × kept(dim1)``. Kept counts are linear in the units kept per group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class CostTerm:
    """``coef × Π kept(slot)`` over at most two slots (a layer dimension).

    ``label`` says what the term counts: for MACs the qualified name of the module (``""`` for a function
    call), for parameters the parameter's name — so costs can be split by layer (bit-widths per layer).
    """

    coef: int
    slots: tuple[int, ...]
    label: str = ""


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
        # kept() as one affine map, with the constant-1 slot appended as a row of zeros + 1.
        self._mult1 = np.vstack([mult.astype(np.int64), np.zeros((1, self.n_groups), dtype=np.int64)])
        self._fixed1 = np.append(np.asarray(fixed, dtype=np.int64), 1)
        self._mult1_t_float = self._mult1.T.astype(np.float64)  # for the float batch path
        self._fixed1_float = self._fixed1.astype(np.float64)
        self._macs = self._compile(macs_terms)
        self._params = self._compile(params_terms)
        self.macs_labels = tuple(t.label for t in macs_terms)
        self.params_labels = tuple(t.label for t in params_terms)
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
        return self._fixed1 + self._mult1 @ np.asarray(keep, dtype=np.int64)

    def _eval(self, compiled: tuple[np.ndarray, np.ndarray, np.ndarray], keep: np.ndarray) -> int:
        k = self.kept(keep)
        if self._int64_exact and k.min() >= 0 and (k <= self._kept_full).all():
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

    def along_group(self, keep: np.ndarray, group: int, metric: str = "macs") -> tuple[int, int, int]:
        """``(a, b, q)`` with cost = a + b·c + q·c² when ``group`` keeps ``c`` units and the others ``keep``.

        Exact (Python ints): every term is bilinear in kept widths and each width is affine in ``c``, so
        the cost is a quadratic polynomial in one group's count — AMC's action wall scans candidates
        with it instead of evaluating the whole model for each."""
        coef, s1, s2 = self.compiled_terms(metric)
        at_zero = np.array(keep, dtype=np.int64)
        at_zero[group] = 0
        k0 = self.kept(at_zero)
        m = self._mult1[:, group]
        if self._int64_exact and k0.min() >= 0 and (k0 <= self._kept_full).all():
            # Coefficients, widths and multiplicities are non-negative and bounded by the unpruned
            # model's, so a, b/2 and q are each at most its cost (< 2**62): int64 is exact.
            a = int(coef @ (k0[s1] * k0[s2]))
            b = int(coef @ (k0[s1] * m[s2] + m[s1] * k0[s2]))
            q = int(coef @ (m[s1] * m[s2]))
        else:
            terms = list(
                zip(
                    coef.tolist(),
                    k0[s1].tolist(),
                    k0[s2].tolist(),
                    m[s1].tolist(),
                    m[s2].tolist(),
                    strict=True,
                )
            )
            a = sum(c * x * y for c, x, y, _, _ in terms)
            b = sum(c * (x * v + u * y) for c, x, y, u, v in terms)
            q = sum(c * u * v for c, _, _, u, v in terms)
        return a, b, q

    def macs(self, keep: np.ndarray) -> int:
        return self._eval(self._macs, keep)

    def reweighted(self, macs_weights: Sequence[int], params_weights: Sequence[int]) -> CostModel:
        """The same cost model with every MACs term's coefficient multiplied by ``macs_weights[i]`` and
        every parameter term's by ``params_weights[i]`` (integers: BitOps are MACs weighted by the bits of
        each layer, a size in bits parameters weighted by theirs). Labels are kept."""

        def terms(
            compiled: tuple[np.ndarray, np.ndarray, np.ndarray], labels: Sequence[str], weights: Sequence[int]
        ) -> list[CostTerm]:
            coef, s1, s2 = compiled
            one = len(self.fixed)
            if len(weights) != len(coef):
                raise ValueError(f"expected {len(coef)} term weights, got {len(weights)}")
            return [
                CostTerm(int(c) * int(w), tuple(int(s) for s in (a, b) if s != one), label)
                for c, a, b, label, w in zip(coef, s1, s2, labels, weights, strict=True)
            ]

        return CostModel(
            self.mult,
            self.fixed,
            terms(self._macs, self.macs_labels, macs_weights),
            terms(self._params, self.params_labels, params_weights),
            self.full.tolist(),
        )

    def macs_by_label(self, keep: np.ndarray) -> dict[str, int]:
        """MACs per module (qualified name; ``""`` for function calls) for ``keep``; they sum to :meth:`macs`."""
        return self._by_label(self._macs, self.macs_labels, keep)

    def params_by_label(self, keep: np.ndarray) -> dict[str, int]:
        """Elements per parameter (by name) for ``keep``; they sum to :meth:`params`."""
        return self._by_label(self._params, self.params_labels, keep)

    def _by_label(
        self, compiled: tuple[np.ndarray, np.ndarray, np.ndarray], labels: Sequence[str], keep: np.ndarray
    ) -> dict[str, int]:
        coef, s1, s2 = compiled
        k = self.kept(keep)
        totals: dict[str, int] = {}
        for label, c, a, b in zip(labels, coef.tolist(), k[s1].tolist(), k[s2].tolist(), strict=True):
            totals[label] = totals.get(label, 0) + c * a * b  # Python ints: exact
        return totals

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
        k = keeps @ self._mult1_t_float + self._fixed1_float
        return (k[:, s1] * k[:, s2]) @ coef.astype(np.float64)


def _as_tuple(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def count_macs(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any]) -> int:
    """Measured MACs of one forward pass: half the FLOPs PyTorch's ``FlopCounterMode`` counts.

    Runs the model in eval mode under ``torch.no_grad`` (so nothing is updated) and restores its modes.
    Attention runs on PyTorch's reference kernels while counting (:func:`reference_attention`).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), reference_attention(), FlopCounterMode(display=False) as counter:
            model(*_as_tuple(example_inputs))
    finally:
        for m, flag in modes.items():
            m.training = flag
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def reference_attention() -> Iterator[None]:
    """Attention on PyTorch's reference kernels, whose matmuls ``FlopCounterMode`` sees: the fused CPU
    kernel of ``scaled_dot_product_attention`` is invisible to it (a ViT-Tiny's 179 M of 1.25 G MACs would
    be dropped), and so is ``nn.MultiheadAttention``'s inference fast path (all of its MACs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
