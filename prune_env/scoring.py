"""Scoring many policies at once: the interface a parallel backend implements.

A :class:`PolicyScorer` receives kept-count vectors of one :class:`~prune_env.problem.PruningProblem` and
returns the proxy's results for them, in order, computed wherever it likes (worker processes, other
machines, GPUs: :class:`prune_env.distributed.RayScorer`). Only the kept counts and the results cross
process boundaries; each worker holds its own copy of the problem, sent once. What was scored, and what it
counts against a search's budget, stays with the caller (:meth:`PruningProblem.prefetch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from prune_env.proxy import ProxyResult


@runtime_checkable
class PolicyScorer(Protocol):
    """Scores batches of kept-count vectors with a problem's proxy, in parallel."""

    @property
    def workers(self) -> int:
        """How many policies it scores at the same time (a batch of this many or more keeps it busy)."""
        ...

    def score(self, keeps: Sequence[tuple[int, ...]]) -> list[ProxyResult]:
        """The proxy's result for each of ``keeps``, in order (deterministic: the same as the problem's own)."""
        ...

    def close(self) -> None:
        """Release the workers."""
        ...
