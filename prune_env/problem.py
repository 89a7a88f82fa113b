"""A pruning problem: everything a search needs, built once, and the one way to score a policy.

Both environments and every agent go through :class:`PruningProblem`, so they are scored identically:
the same base model, dependency graph, channel ranking, budget projection and proxy (validation data only).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.data import Splits, as_splits
from prune_env.device import resolve_device
from prune_env.graph import DependencyGraph, build_graph, units_to_keep
from prune_env.importance import Importance, get_importance
from prune_env.proxy import DEFAULT_BN_RECALIB_BATCHES, FAST_EVAL_SAMPLES, Proxy, ProxyEvaluator
from prune_env.rewards import Outcome
from prune_env.spaces import BudgetProjector, keep_to_ratios
from prune_env.surgery import ModelRebuilder, prune_channels
from prune_env.train import train_base

ModelArg = str | nn.Module | Callable[[], nn.Module]


class PruningProblem:
    """A base model, its data and graph, a cost budget and a proxy that scores pruned models.

    Args:
        model: a zoo name (trained once and cached), a zero-argument factory (trained likewise) or an
            ``nn.Module`` taken as already trained (it is copied, never modified).
        dataset: a name for :func:`prune_env.data.load` or a :class:`~prune_env.data.Splits`.
        target_macs / target_params: the budget as a fraction of the base model's MACs (default 0.5) or
            parameters; give at most one.
        importance: which channels of a group go first ("l1", "l2", "bn_scale", "random" or a callable);
            ranked once on the base model, so a pruned model depends only on the kept counts.
        max_ratio: the largest fraction of any group that may be removed; round_to: kept counts are
            rounded to multiples of this.
        fill_budget: the target is a budget to spend, not only a ceiling: a policy that prunes more than
            it needs is scaled back until it just fits (see :meth:`BudgetProjector.project`). Applies to
            whole policies (the one-shot environment and the agents), not to the layer-wise env's steps.
        eval_samples, bn_recalib_batches, finetune_steps: proxy settings (see :class:`ProxyEvaluator`);
            or pass ``proxy`` to plug in another :class:`Proxy` (it then receives the pruned models).
        seed: seeds the data split, base training and the proxy's fixed batches.
    """

    def __init__(
        self,
        model: ModelArg = "resnet20",
        dataset: str | Splits = "digits",
        *,
        target_macs: float | None = None,
        target_params: float | None = None,
        importance: str | Importance = "l1",
        max_ratio: float = 0.8,
        round_to: int = 1,
        fill_budget: bool = False,
        eval_samples: int | None = FAST_EVAL_SAMPLES,
        bn_recalib_batches: int = DEFAULT_BN_RECALIB_BATCHES,
        finetune_steps: int = 0,
        proxy: Proxy | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if target_macs is not None and target_params is not None:
            raise ValueError("give target_macs or target_params, not both")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        self.metric = "params" if target_params is not None else "macs"
        self.target = float(target_params if target_params is not None else (target_macs or 0.5))
        self.device = resolve_device(device)
        self.seed = seed
        self.max_ratio = max_ratio
        self.round_to = round_to
        self.fill_budget = fill_budget

        self.splits = as_splits(dataset, seed=seed)
        self.base_model, self.base_metrics = self._base_model(model, train_kwargs or {}, progress)
        self.example_inputs = self.splits.example_inputs(1).to(self.device)
        self.graph: DependencyGraph = build_graph(self.base_model, self.example_inputs)
        if not self.graph.groups:
            raise ValueError(f"{type(self.base_model).__name__} has no prunable channel group")
        self.channels = np.array([g.channels for g in self.graph.groups], dtype=np.int64)
        self.projector = BudgetProjector(
            self.graph.costs, self.channels, metric=self.metric, max_ratio=max_ratio, round_to=round_to
        )
        self.projector.check_target(self.target)
        score = get_importance(importance, seed)
        # Rank every group's units once: a pruned model is then a function of the kept counts alone,
        # which makes evaluations memoisable and the hot path free of importance computation.
        self.rankings = [
            np.argsort(-np.asarray(score(g, self.base_model), dtype=np.float64), kind="stable")
            for g in self.graph.groups
        ]
        self.proxy: Proxy = proxy or ProxyEvaluator(
            self.base_model,
            self.splits,
            eval_samples=eval_samples,
            bn_recalib_batches=bn_recalib_batches,
            finetune_steps=finetune_steps,
            seed=seed,
            device=self.device,
        )
        full = self.proxy.evaluate(self.base_model)
        self.base_accuracy = float(full["accuracy"])
        self.base_loss = float(full["loss"])
        self.evaluations = 0  # proxy evaluations that were not memo hits
        self._results: dict[tuple[int, ...], dict[str, float]] = {}
        self._rebuilder: ModelRebuilder | None = None

    # -- construction -------------------------------------------------------------------------------
    def _base_model(
        self, model: ModelArg, train_kwargs: Mapping[str, Any], progress: bool
    ) -> tuple[nn.Module, dict[str, float]]:
        if isinstance(model, nn.Module):
            return copy.deepcopy(model).to(self.device).eval(), {}
        trained, metrics = train_base(
            model, self.splits, seed=self.seed, device=self.device, progress=progress, **dict(train_kwargs)
        )
        return trained.eval(), dict(metrics)

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return len(self.channels)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.graph.groups]

    # -- policies -----------------------------------------------------------------------------------
    def keep_for(self, ratios: Sequence[float] | np.ndarray, target: float | None = None) -> np.ndarray:
        """Kept units per group for ``ratios`` after budget projection (cost <= target, always)."""
        r = np.asarray(ratios, dtype=np.float64).reshape(-1)
        if r.shape != (self.n_groups,):
            raise ValueError(f"expected {self.n_groups} ratios (one per group), got shape {np.shape(ratios)}")
        if not np.all(np.isfinite(r)):
            raise ValueError("ratios contain NaN or inf")
        return self.projector.project(r, self.target if target is None else target, fill=self.fill_budget)

    def ratios_for(self, keep: np.ndarray) -> np.ndarray:
        return keep_to_ratios(self.channels, keep)

    def uniform_keep(self, target: float | None = None) -> np.ndarray:
        """The uniform policy: the same ratio everywhere, the smallest that meets the target."""
        return self.keep_for(np.zeros(self.n_groups), target)

    def build(self, keep: np.ndarray) -> nn.Module:
        """The physically pruned model keeping ``keep[g]`` top-ranked units of each group."""
        return prune_channels(self.base_model, self.graph, self._units(keep))

    def build_for_evaluation(self, keep: np.ndarray) -> nn.Module:
        """The pruned model for one proxy evaluation, handed over to the proxy.

        With a proxy that keeps no reference to the models it scores (``Proxy.keeps_models`` false, as
        for :class:`ProxyEvaluator`), every call rebuilds into the same module objects
        (:class:`~prune_env.surgery.ModelRebuilder`): the previous result is overwritten, and the hot path
        pays no deep copy of the module tree. Otherwise it is :meth:`build`.
        """
        if getattr(self.proxy, "keeps_models", True):  # duck-typed proxies: assume they might
            return self.build(keep)
        if self._rebuilder is None:
            self._rebuilder = ModelRebuilder(self.base_model, self.graph)
        return self._rebuilder.rebuild(self._units(keep))

    def _units(self, keep: np.ndarray) -> list[np.ndarray]:
        keep = np.asarray(keep, dtype=np.int64)
        return [np.sort(order[:k]) for order, k in zip(self.rankings, keep, strict=True)]

    def evaluate_keep(self, keep: np.ndarray, target: float | None = None) -> Outcome:
        """Score an already projected policy (kept units per group) with the proxy."""
        keep = np.asarray(keep, dtype=np.int64)
        start = time.perf_counter()
        key = tuple(keep.tolist())
        memo_hit = key in self._results
        if not memo_hit:
            # The pruned model is a function of the kept counts (rankings are fixed), so is its score.
            self._results[key] = self.proxy.evaluate_owned(self.build_for_evaluation(keep))
            self.evaluations += 1
        result = self._results[key]
        return self.outcome(
            keep,
            accuracy=float(result["accuracy"]),
            loss=float(result["loss"]),
            target=target,
            eval_seconds=time.perf_counter() - start,
            memo_hit=memo_hit,
        )

    def outcome(
        self,
        keep: np.ndarray,
        *,
        accuracy: float,
        loss: float,
        target: float | None = None,
        eval_seconds: float = 0.0,
        memo_hit: bool = False,
    ) -> Outcome:
        """The :class:`Outcome` of kept units ``keep`` scored ``accuracy``/``loss``, in this problem's terms
        (costs, base model, target) — also for scores obtained elsewhere (RL-Pruner's later rounds)."""
        keep = np.asarray(keep, dtype=np.int64)
        costs = self.graph.costs
        return Outcome(
            accuracy=accuracy,
            loss=loss,
            base_accuracy=self.base_accuracy,
            base_loss=self.base_loss,
            macs=costs.macs(keep),
            params=costs.params(keep),
            base_macs=self.graph.base_macs,
            base_params=self.graph.base_params,
            target=self.target if target is None else float(target),
            metric=self.metric,
            ratios=self.ratios_for(keep),
            keep=tuple(keep.tolist()),
            eval_seconds=eval_seconds,
            memo_hit=memo_hit,
        )

    def evaluate(self, ratios: Sequence[float] | np.ndarray, target: float | None = None) -> Outcome:
        """Project ``ratios`` onto the budget, prune, and score with the proxy."""
        return self.evaluate_keep(self.keep_for(ratios, target), target)

    def keep_counts(self, ratios: Sequence[float] | np.ndarray) -> np.ndarray:
        """Kept units for ``ratios`` without projection (the plain rounding rule)."""
        return units_to_keep(self.channels, ratios, self.round_to)
