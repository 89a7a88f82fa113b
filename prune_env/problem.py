"""A pruning problem: everything a search needs, built once, and the one way to score a policy.

Both environments and every agent go through :class:`PruningProblem`, so they are scored identically:
the same base model, dependency graph, channel ranking, budget projection and proxy (validation data only).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.batches import iterate_batches
from prune_env.budget import keep_to_ratios
from prune_env.data import DataSource, as_splits
from prune_env.device import resolve_device, to_device
from prune_env.errors import InvalidRatiosError, InvalidSettingError, UnsupportedLayerError
from prune_env.graph import DependencyGraph, build_graph, example_tuple, units_to_keep
from prune_env.importance import get_importance
from prune_env.latency.budget import LatencyCheck, LatencyCost, settings_projector
from prune_env.latency.guard import LatencyFit, fit_to_measurement
from prune_env.models import ModelSpec
from prune_env.problem_inputs import check_classifier, check_given_proxy, check_model_arg, check_without_data
from prune_env.proxies import make_proxy
from prune_env.proxy import Proxy, ProxyContext, ProxyResult
from prune_env.quantization.joint import JointPolicies
from prune_env.rewards import Outcome
from prune_env.scoring import PolicyScorer
from prune_env.settings import ProblemSettings
from prune_env.splits import Splits, required_splits
from prune_env.surgery import ModelRebuilder, prune_channels
from prune_env.train import check_train_options, train_base
from prune_env.validation import check_settings

IMPORTANCE_BATCH_SIZE = 64  # training batches that data-driven importance criteria read


def _prunable_graph(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    graph = build_graph(model, example_inputs)
    if not graph.groups:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no prunable channel group (the engine found no convolution or "
            "linear layer whose output channels it can remove)"
        )
    return graph


def _built_proxy(proxy: Proxy | Callable[[ProxyContext], Proxy] | None, context: ProxyContext) -> Proxy:
    """The problem's proxy: the settings' named one, the given object, or what the given factory builds."""
    if proxy is None:
        return make_proxy(context)
    if isinstance(proxy, Proxy):
        return proxy
    built = proxy(context)
    if not isinstance(built, Proxy):
        raise InvalidSettingError(
            f"the proxy factory returned {type(built).__name__}, not a prune_env.proxy.Proxy"
        )
    return built


class PruningProblem:
    """A base model, its data and graph, a cost budget and a proxy that scores pruned models.

    Args:
        model: a zoo name (trained once and cached), a zero-argument factory (trained likewise) or an
            ``nn.Module`` taken as already trained (it is copied, never modified).
        dataset: a name for :func:`prune_env.data.load` or a :class:`~prune_env.data.Splits`.
        settings: a :class:`~prune_env.settings.ProblemSettings` (the budget, the projection's limits, the
            channel ranking, the proxy, the seed); keyword arguments replace single fields of it
            (``PruningProblem("resnet20", target_macs=0.3, eval_samples=500)``), unknown ones are refused.
        proxy: a proxy's name (the ``proxy`` setting: ``"recalibration"``, ``"distillation"``,
            ``"supernet"``, ``"pruningnet"``), another :class:`Proxy` to score pruned models with, or a callable that builds one from the
            problem's :class:`~prune_env.proxy.ProxyContext` (``functools.partial(SupernetProxy,
            config=SupernetConfig(steps=3000))``); the settings' proxy fields must then stay at their
            defaults, since they would be ignored. By default the proxy ``settings.proxy`` names is built
            (:func:`prune_env.proxies.make_proxy`).
        train_kwargs: options of :func:`prune_env.train.train_base` for a model trained here.

    The settings in brief: ``target_macs`` / ``target_params`` / ``target_latency`` (default 0.5 of the
    MACs; a latency is predicted from a table measured on this machine at ``latency_batch``), ``importance``
    (ranked once on the base model, so a pruned model depends only on the kept counts), ``max_ratio`` and
    ``round_to`` (the projection's limits), ``fill_budget`` (default on: a policy that prunes more than it needs
    is scaled back until it just fits; whole policies only, not the layer-wise env's steps),
    ``eval_samples``, ``bn_recalib_batches``, ``finetune_steps`` (see :class:`ProxyEvaluator`), ``proxy``
    and ``proxy_steps`` (a proxy by name; ``"supernet"`` and ``"pruningnet"`` are trained here once and
    cached, see :mod:`prune_env.supernet`), ``seed``.
    """

    def __init__(
        self,
        model: ModelSpec = "resnet20",
        dataset: DataSource | None = "digits",
        settings: ProblemSettings | None = None,
        *,
        proxy: str | Proxy | Callable[[ProxyContext], Proxy] | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        example_inputs: Any = None,
        **overrides: Any,
    ) -> None:
        # Everything is checked before the data is loaded or a model trained.
        if settings is not None and not isinstance(settings, ProblemSettings):
            raise InvalidSettingError(f"settings must be a ProblemSettings, got {type(settings).__name__}")
        if isinstance(proxy, str):  # a proxy by name is the setting of that name
            overrides = {**overrides, "proxy": proxy}
            proxy = None
        s = ProblemSettings.from_kwargs(overrides, settings)
        check_model_arg(model)
        if proxy is not None:
            check_given_proxy(proxy, s)
        check_train_options(train_kwargs or {})
        if example_inputs is not None:
            example_inputs = example_tuple(example_inputs)
        if dataset is None:
            check_without_data(model, proxy, example_inputs, s)
        # Data-driven criteria read a few seeded training batches (the splits load below; only then is
        # the source called).
        score = get_importance(s.importance, s.seed, batches=self._importance_batches)
        self.settings = s
        self.metric = s.metric
        self.target = s.target
        self.device = resolve_device(s.device)
        self.seed = s.seed
        self.max_ratio = s.max_ratio
        self.round_to = s.round_to
        self.fill_budget = s.fill_budget

        self.splits: Splits | None = as_splits(dataset, seed=s.seed) if dataset is not None else None
        self.base_model, self.base_metrics = self._base_model(model, train_kwargs or {}, s.progress)
        # The input the graph is built on and costs are counted for: the data's shape, or the user's own
        # (a detector's list of images), as a tuple of the model's arguments.
        self.example_inputs: Any = (
            to_device(example_inputs, self.device)
            if example_inputs is not None
            else self.data.example_inputs(1).to(self.device)
        )
        if self.splits is not None and isinstance(self.example_inputs, torch.Tensor):
            check_classifier(self.base_model, self.example_inputs, self.splits.num_classes)
        self.graph: DependencyGraph = _prunable_graph(self.base_model, self.example_inputs)
        self.units = np.array([g.units for g in self.graph.groups], dtype=np.int64)  # per group
        # Pruning-only costs (the environments' features, the action wall): MACs unless parameters or
        # latency are the budget (a BitOps or size budget is the joint projector's). A latency is priced by
        # the base model's table (cached; measured once on this machine), built before anything is scored.
        self.projector = settings_projector(s, self.base_model, self.example_inputs, self.graph, self.device)
        self.latency = self.projector.predicted
        # Joint policies (bits per group as well): their budget is checked here too, before any proxy is
        # built (a supernet trains for minutes).
        self.joint: JointPolicies | None = JointPolicies(self.base_model, self.graph, s) if s.joint else None
        self.check_target(self.target)
        # Rank every group's units once: a pruned model is then a function of the kept counts alone,
        # which makes evaluations memoisable and the hot path free of importance computation. The scores
        # are kept beside the ranking (copies): allocation baselines compare them across groups.
        self.importance_scores = [
            np.array(score(g, self.base_model), dtype=np.float64) for g in self.graph.groups
        ]
        self.rankings = [np.argsort(-s, kind="stable") for s in self.importance_scores]
        context = ProxyContext(
            base_model=self.base_model,
            graph=self.graph,
            rankings=tuple(self.rankings),
            splits=self.splits,
            example_inputs=self.example_inputs,
            settings=s,
            device=self.device,
        )
        self.proxy: Proxy = _built_proxy(proxy, context)
        if self.joint is not None:
            self.joint.score_with(self.proxy, context)
        full = self._checked(
            self.proxy.evaluate_policy(self.units.copy(), lambda: copy.deepcopy(self.base_model))
        )
        self.base_accuracy = full.accuracy
        self.base_loss = full.loss
        self.evaluations = 0  # proxy evaluations that were not memo hits
        self._results: dict[tuple[int, ...], ProxyResult] = {}
        # Policies scored by prefetch() and not asked for yet: their share of the batch's seconds.
        self._prefetched: dict[tuple[int, ...], float] = {}
        self._rebuilder: ModelRebuilder | None = None

    # -- construction -------------------------------------------------------------------------------
    @property
    def data(self) -> Splits:
        """The problem's splits; :class:`InvalidSettingError` for a problem given none (a user's metric
        scores it, and nothing here trains or reads data)."""
        return required_splits(self.splits, "this use of the problem")

    def _base_model(
        self, model: ModelSpec, train_kwargs: Mapping[str, Any], progress: bool
    ) -> tuple[nn.Module, dict[str, float]]:
        if isinstance(model, nn.Module):
            return copy.deepcopy(model).to(self.device).eval(), {}
        trained, metrics = train_base(
            model, self.data, seed=self.seed, device=self.device, progress=progress, **dict(train_kwargs)
        )
        return trained.eval(), dict(metrics)

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return len(self.units)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.graph.groups]

    # -- policies -----------------------------------------------------------------------------------
    def keep_for(self, ratios: Sequence[float] | np.ndarray, target: float | None = None) -> np.ndarray:
        """Kept units per group for ``ratios`` after budget projection (cost <= target, always)."""
        if self.joint is not None and self.joint.constrained:
            raise InvalidSettingError(
                f"a {self.metric} budget depends on bits as well as channels: project joint policies with "
                "joint_keep_for(ratios, weight_bits, activation_bits)"
            )
        raw = np.asarray(ratios)
        if raw.dtype.kind not in "fiu":
            raise InvalidRatiosError(f"ratios must be real numbers, got dtype {raw.dtype}")
        r = raw.astype(np.float64)
        if r.shape != (self.n_groups,):  # a (1, n) array is refused, as the environments refuse it
            raise InvalidRatiosError(
                f"expected {self.n_groups} ratios (one per group), got shape {np.shape(ratios)}"
            )
        if not np.all(np.isfinite(r)):
            raise InvalidRatiosError("ratios contain NaN or inf")
        return self.projector.project(r, self.target_or(target), fill=self.fill_budget)

    def ratios_for(self, keep: np.ndarray) -> np.ndarray:
        return keep_to_ratios(self.units, keep)

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

    def _checked(self, result: object) -> ProxyResult:
        if not isinstance(result, ProxyResult):
            raise InvalidSettingError(
                f"{type(self.proxy).__name__}.evaluate returned {type(result).__name__}; a proxy returns a "
                "prune_env.proxy.ProxyResult(accuracy=..., loss=...)"
            )
        return result

    def _importance_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for data-driven importance: the same shuffled ones every call, never val/test."""
        generator = torch.Generator().manual_seed(self.seed)
        return iterate_batches(self.data.train, IMPORTANCE_BATCH_SIZE, shuffle=True, generator=generator)

    def scored_model(self, keep: np.ndarray) -> nn.Module:
        """The pruned model exactly as the proxy scored it (BatchNorm recalibrated, distilled if the
        proxy distils): what a run saves when it is not fine-tuned, and where a fine-tune starts."""
        keep = np.asarray(keep, dtype=np.int64)
        return self.proxy.prepare_policy(keep, lambda: self.build(keep))

    def remember(self, keep: Sequence[int] | np.ndarray, accuracy: float, loss: float) -> None:
        """Record the proxy's result for ``keep`` obtained earlier (a resumed run's log), so scoring that
        policy again costs no proxy evaluation. The proxy is deterministic, so the result is the same."""
        self._results[tuple(int(k) for k in keep)] = ProxyResult(accuracy=float(accuracy), loss=float(loss))

    def proxy_result(self, keep: np.ndarray) -> ProxyResult:
        """The proxy's result for projected kept counts ``keep``, scored once and then remembered."""
        keep = np.asarray(keep, dtype=np.int64)
        # The pruned model is a function of the kept counts (rankings are fixed), so is its score.
        return self._remembered(
            tuple(keep.tolist()),
            lambda: self.proxy.evaluate_policy(keep, lambda: self.build_for_evaluation(keep)),
        )

    def _remembered(self, key: tuple[int, ...], score: Callable[[], object]) -> ProxyResult:
        """The result remembered for ``key``, else ``score()`` checked, counted and remembered."""
        if key not in self._results:
            self._results[key] = self._checked(score())
            self.evaluations += 1
        return self._results[key]

    def target_or(self, target: Any) -> float:
        """``target`` checked (a fraction in (0, 1] of the base cost this problem can reach), or this
        problem's own target for None: every method taking a ``target`` goes through here."""
        if target is None:
            return self.target
        checked = float(check_settings({"target": target})["target"])
        self.check_target(checked)
        return checked

    def check_target(self, target: float) -> None:
        """Refuse a budget this problem cannot meet (in its metric), naming the smallest it can."""
        if self.joint is not None and self.joint.constrained:
            self.joint.projector.check_target(target)
        else:
            self.projector.check_target(target)

    def _joint(self) -> JointPolicies:
        if self.joint is None:
            raise InvalidSettingError(
                "this problem's policies choose channels only; make it with quantize=True (or a target_bitops "
                "or target_size budget) for policies that choose bits as well"
            )
        return self.joint

    def joint_keep_for(
        self,
        ratios: Sequence[float] | np.ndarray,
        weight_bits: Sequence[int] | np.ndarray,
        activation_bits: Sequence[int] | np.ndarray,
        target: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keep, weight_bits, activation_bits)`` of a joint policy after budget projection: with a BitOps
        or size budget, bits are lowered only if no pruning fits with them (see
        :class:`~prune_env.quantization.budget.JointProjector`); with a MACs or parameter budget the bits
        are free and only the ratios are projected."""
        joint = self._joint()
        target = self.target_or(target)
        if joint.constrained:
            r = np.asarray(ratios, dtype=np.float64)
            if r.shape != (self.n_groups,) or not np.all(np.isfinite(r)):
                raise InvalidRatiosError(
                    f"expected {self.n_groups} finite ratios (one per group), got shape {r.shape}"
                )
            return joint.projector.project(r, weight_bits, activation_bits, target, fill=self.fill_budget)
        return self.keep_for(ratios, target), *joint.projector.checked_bits(weight_bits, activation_bits)

    def evaluate_joint(
        self,
        keep: np.ndarray,
        weight_bits: np.ndarray,
        activation_bits: np.ndarray,
        target: float | None = None,
    ) -> Outcome:
        """Score an already projected joint policy: the pruned model as the proxy prepares it, quantized
        (:class:`~prune_env.quantization.proxy.QuantizedScoring`). Remembered per (kept counts, bits)."""
        joint = self._joint()
        target = self.target_or(target)  # refused before any evaluation
        keep = np.asarray(keep, dtype=np.int64)
        w = np.asarray(weight_bits, dtype=np.int64)
        a = np.asarray(activation_bits, dtype=np.int64)
        start = time.perf_counter()
        key = (*keep.tolist(), -1, *w.tolist(), -1, *a.tolist())  # -1: never a count or a width
        memo_hit = key in self._results
        result = self._remembered(
            key,
            lambda: joint.scoring.evaluate(keep, joint.plan(w, a), lambda: self.build_for_evaluation(keep)),
        )
        return self.outcome(
            keep,
            accuracy=result.accuracy,
            loss=result.loss,
            target=target,
            eval_seconds=time.perf_counter() - start,
            memo_hit=memo_hit,
            bits=(w, a),
        )

    def prefetch(self, keeps: Sequence[Sequence[int] | np.ndarray], scorer: PolicyScorer) -> None:
        """Score the policies among ``keeps`` (projected kept counts) that were never scored, all at once
        with ``scorer`` (several worker processes or machines), so that :meth:`evaluate_keep` of each then
        returns at once. The scores are the proxy's, computed on copies of this problem: the same as
        :meth:`evaluate_keep` would give, whichever worker computed them. A policy first asked for after
        a prefetch counts as a fresh evaluation, not a memo hit."""
        todo = list(dict.fromkeys(tuple(int(k) for k in keep) for keep in keeps))
        todo = [key for key in todo if key not in self._results]
        if not todo:
            return
        start = time.perf_counter()
        results = scorer.score(todo)
        if len(results) != len(todo):
            raise InvalidSettingError(
                f"{type(scorer).__name__}.score returned {len(results)} results for {len(todo)} policies"
            )
        share = (time.perf_counter() - start) / len(todo)
        for key, result in zip(todo, results, strict=True):
            self._results[key] = self._checked(result)
            self._prefetched[key] = share
            self.evaluations += 1

    def _units(self, keep: np.ndarray) -> list[np.ndarray]:
        keep = np.asarray(keep, dtype=np.int64)
        return [np.sort(order[:k]) for order, k in zip(self.rankings, keep, strict=True)]

    def evaluate_keep(self, keep: np.ndarray, target: float | None = None) -> Outcome:
        """Score an already projected policy (kept units per group) with the proxy."""
        target = self.target_or(target)  # refused before any evaluation
        keep = np.asarray(keep, dtype=np.int64)
        start = time.perf_counter()
        key = tuple(keep.tolist())
        prefetched = self._prefetched.pop(key, None)
        memo_hit = key in self._results and prefetched is None
        result = self.proxy_result(keep)
        return self.outcome(
            keep,
            accuracy=result.accuracy,
            loss=result.loss,
            target=target,
            eval_seconds=time.perf_counter() - start if prefetched is None else prefetched,
            memo_hit=memo_hit,
        )

    def check_latency(self, keep: np.ndarray, model: nn.Module, rounds: int | None = None) -> LatencyCheck:
        """Measure ``model`` (this problem's base model pruned to ``keep``, fine-tuned or not) and the base
        model by the protocol of the latency table, beside the table's prediction for ``keep``: what a
        latency budget promised against what the machine delivers. ``rounds`` (default: the
        ``latency_rounds`` setting) measurements of the pair, the round of median ratio kept.

        Raises:
            InvalidSettingError: the problem has no latency budget (so no table to check against).
        """
        cost, counts = self._latency_cost(), self._checked_keep(keep)
        rounds = self.settings.latency_rounds if rounds is None else rounds
        return cost.check(counts, model, self.base_model, self.example_inputs, rounds)

    def fit_latency(self, keep: np.ndarray) -> LatencyFit:
        """``keep`` held to the latency target by measurement: measured (``latency_rounds`` rounds) and,
        while it runs above the target by more than the table's protocol noise, projected onto a predicted
        budget lowered by the measured overshoot (:mod:`prune_env.latency.guard`). The search's own
        choice when it measures within the target.

        Raises:
            InvalidSettingError: the problem has no latency budget.
        """
        cost, counts = self._latency_cost(), self._checked_keep(keep)
        noise = float(cost.model.table.noise)
        return fit_to_measurement(
            counts,
            self.target,
            noise if math.isfinite(noise) and noise > 0 else 0.0,
            lambda k: self.check_latency(k, self.build(k)),
            lambda k, budget: self.projector.project(self.ratios_for(k), budget, fill=self.fill_budget),
            self.projector.min_cost_ratio,
            cost.full_ms,
        )

    def _latency_cost(self) -> LatencyCost:
        if not isinstance(self.latency, LatencyCost):
            raise InvalidSettingError(
                f"the problem budgets {self.metric}, not latency: a latency is checked against the table a "
                "latency budget (target_latency=...) is priced by"
            )
        return self.latency

    def _checked_keep(self, keep: np.ndarray) -> np.ndarray:
        counts = np.asarray(keep)
        if counts.shape != self.units.shape or counts.dtype.kind not in "iu":
            raise InvalidRatiosError(
                f"keep must hold one integer count per group ({len(self.units)}), got {counts.tolist()!r:.80}"
            )
        return counts

    def outcome(
        self,
        keep: np.ndarray,
        *,
        accuracy: float,
        loss: float,
        target: float | None = None,
        eval_seconds: float = 0.0,
        memo_hit: bool = False,
        bits: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Outcome:
        """The :class:`Outcome` of kept units ``keep`` scored ``accuracy``/``loss``, in this problem's terms
        (costs, base model, target) — also for scores obtained elsewhere (RL-Pruner's later rounds)."""
        keep = np.asarray(keep, dtype=np.int64)
        costs = self.graph.costs
        extra: dict[str, Any] = {}
        if bits is not None:
            w, a = bits
            cost_bitops, cost_size = self._joint().costs(keep, w, a)
            extra = {
                "weight_bits": tuple(int(b) for b in w),
                "activation_bits": tuple(int(b) for b in a),
                "bitops": cost_bitops,
                "size_bits": cost_size,
                "base_bitops": self._joint().base_bitops,
                "base_size_bits": self._joint().base_size_bits,
            }
        if self.latency is not None:  # the predicted latency beside the counted costs
            extra["latency_ms"] = float(self.latency.predict(keep))
            extra["base_latency_ms"] = float(self.projector.base_cost)
        return Outcome(
            accuracy=accuracy,
            loss=loss,
            base_accuracy=self.base_accuracy,
            base_loss=self.base_loss,
            macs=costs.macs(keep),
            params=costs.params(keep),
            base_macs=self.graph.base_macs,
            base_params=self.graph.base_params,
            target=self.target_or(target),
            metric=self.metric,
            ratios=self.ratios_for(keep),
            keep=tuple(keep.tolist()),
            eval_seconds=eval_seconds,
            memo_hit=memo_hit,
            **extra,
        )

    def evaluate(self, ratios: Sequence[float] | np.ndarray, target: float | None = None) -> Outcome:
        """Project ``ratios`` onto the budget, prune, and score with the proxy."""
        return self.evaluate_keep(self.keep_for(ratios, target), target)

    def unprojected_keep(self, ratios: Sequence[float] | np.ndarray) -> np.ndarray:
        """Kept units for ``ratios`` without projection (the plain rounding rule)."""
        return units_to_keep(self.units, ratios, self.round_to)
