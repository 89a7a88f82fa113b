"""What the trained proxies share: training sub-networks once per problem, the disk cache, and scoring.

A :class:`TrainedProxy` starts from a copy of the base model (so before training its full sub-network
*is* the base model), trains it through sub-networks sampled by the sandwich rule for a fixed number of
steps on the training split, and caches the result like a base model: keyed by everything that
determines it, written atomically, loaded weights-only. A policy is scored like the recalibration proxy
scores a pruned model — BatchNorm statistics re-estimated on fixed training batches, accuracy and loss
on a fixed validation subset — but on the sub-network with the trained weights, so scoring costs one
rebuild and one recalibrated evaluation, about what the default proxy costs.

Only ``splits.train`` (training batches) and ``splits.val`` (through the scorer) are read; the test
split is never touched.
"""

from __future__ import annotations

import copy
import itertools
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from prune_env.batches import iterate_batches
from prune_env.cache import (
    array_digest,
    cache_dir,
    cache_key,
    dataset_fingerprint,
    load_entry,
    save_entry,
    state_digest,
)
from prune_env.device import seed_generators
from prune_env.proxy import Proxy, ProxyContext, ProxyEvaluator, ProxyResult
from prune_env.settings import DEFAULT_SUPERNET_FINETUNE_STEPS
from prune_env.supernet.config import SupernetConfig
from prune_env.supernet.subnets import SharedWeights, SubnetSampler

CACHE_FORMAT = 1


class TrainedProxy(Proxy):
    """A proxy whose weights are trained once per problem through sampled sub-networks (abstract).

    Subclasses say what is trained (:meth:`trainable`), the loss of one sub-network on one batch
    (:meth:`subnet_loss`) and, if the sub-network's weights are not plain slices of the shared ones,
    how they are made (:meth:`generated`).

    Attributes after construction: ``train_seconds`` (of the training that made the weights, also when
    they came from the cache), ``cached`` (whether they did), ``cache_path``.
    """

    kind: ClassVar[str]

    def __init__(
        self,
        context: ProxyContext,
        config: SupernetConfig | None = None,
        *,
        cache: str | Path | None = None,
        use_cache: bool = True,
    ) -> None:
        s = context.settings
        if config is None:
            config = SupernetConfig() if s.proxy_steps is None else SupernetConfig(steps=s.proxy_steps)
        if not isinstance(config, SupernetConfig):
            raise TypeError(f"config must be a SupernetConfig, got {type(config).__name__}")
        self.keeps_models = False
        self.config = config
        self.device = context.device
        self.seed = s.seed
        self.progress = s.progress
        self.teacher = copy.deepcopy(context.base_model).to(self.device).eval().requires_grad_(False)
        self.shared = SharedWeights(
            copy.deepcopy(context.base_model).to(self.device), context.graph, context.rankings
        )
        units = np.array([g.units for g in context.graph.groups], dtype=np.int64)
        self.sampler = SubnetSampler(
            units,
            s.max_ratio,
            s.round_to,
            s.seed,
            costs=context.graph.costs,
            macs_band=config.macs_band,
        )
        self.setup(context)
        self.scorer = ProxyEvaluator(
            context.base_model,
            context.data,
            eval_samples=s.eval_samples,
            bn_recalib_batches=s.bn_recalib_batches,
            finetune_steps=(
                DEFAULT_SUPERNET_FINETUNE_STEPS if s.finetune_steps is None else s.finetune_steps
            ),
            seed=s.seed,
            device=self.device,
        )
        key = cache_key(self.cache_payload(context))
        self.cache_path = cache_dir(cache) / "proxies" / f"{self.kind}-{key[:24]}.pt"
        entry = load_entry(self.cache_path, key, CACHE_FORMAT) if use_cache else None
        self.cached = entry is not None
        if entry is not None:
            self.trainable().load_state_dict(entry["state_dict"])
            self.train_seconds = float(entry["metrics"]["train_seconds"])
        else:
            self.train_seconds = self.fit(context.data.train)
            if use_cache:
                save_entry(
                    self.cache_path,
                    key,
                    CACHE_FORMAT,
                    self.trainable().state_dict(),
                    metrics={"train_seconds": self.train_seconds},
                )
        self.trainable().eval()

    # -- what subclasses define -------------------------------------------------------------------
    def setup(self, context: ProxyContext) -> None:
        """Build whatever else is trained (called once, before training or loading)."""

    @abstractmethod
    def trainable(self) -> nn.Module:
        """The module holding every trained tensor (what is cached)."""

    @abstractmethod
    def subnet_loss(
        self, keep: np.ndarray, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """The training loss of the sub-network keeping ``keep`` on one batch."""

    def record_teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The unpruned model's logits on ``x`` (and anything else a subclass records with them)."""
        with torch.no_grad():
            logits: torch.Tensor = self.teacher(x)
        return logits

    def generated(self, keep: np.ndarray) -> dict[str, torch.Tensor] | None:
        """Full-size tensors to slice instead of the shared ones for ``keep`` (after :meth:`select`)."""
        return None

    # -- the cache ----------------------------------------------------------------------------------
    def cache_payload(self, context: ProxyContext) -> dict[str, Any]:
        """Everything that determines the trained weights."""
        s = context.settings
        return {
            "format": CACHE_FORMAT,
            "kind": self.kind,
            "structure": repr(context.base_model),
            "weights": state_digest(context.base_model.state_dict()),
            "groups": [[g.name, g.units] for g in context.graph.groups],
            "rankings": array_digest(list(context.rankings)),
            "data": dataset_fingerprint(context.data, test=False),
            "seed": s.seed,
            "max_ratio": s.max_ratio,
            "round_to": s.round_to,
            "config": asdict(self.config),
        }

    # -- training -----------------------------------------------------------------------------------
    def fit(self, train: Dataset[Any]) -> float:
        """Train for ``config.steps`` steps on ``train``; returns the seconds it took."""
        c = self.config
        trainable = self.trainable().train()
        params = [p for p in trainable.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=c.lr, momentum=0.9, nesterov=c.lr > 0, weight_decay=c.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(c.steps, 1))
        start = time.perf_counter()
        batches = self._batches(train)
        bar = tqdm(
            total=c.steps,
            desc=f"train {self.kind} proxy (once, then cached)",
            disable=not self.progress or c.steps == 0,
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            seed_generators(self.seed, self.device)
            for _ in range(c.steps):
                x, y = next(batches)
                x, y = x.to(self.device), y.to(self.device)
                teacher_logits = self.record_teacher(x)
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for keep in self.sampler.sandwich(c.random_subnets):
                    loss = self.subnet_loss(keep, x, y, teacher_logits)
                    loss.backward()
                    total += float(loss.detach())
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}", refresh=False)
        bar.close()
        return time.perf_counter() - start

    def _batches(self, train: Dataset[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        n = len(train)  # type: ignore[arg-type]
        for _ in itertools.count():
            yield from iterate_batches(
                train,
                self.config.batch_size,
                shuffle=True,
                generator=generator,
                drop_last=n >= self.config.batch_size,
            )

    # -- scoring ------------------------------------------------------------------------------------
    def select(self, keep: np.ndarray) -> nn.Module:
        """The sub-network keeping ``keep`` with this proxy's weights (reused module; a throw-away)."""
        module = self.shared.select(keep)
        with torch.no_grad():
            generated = self.generated(keep)
            if generated is not None:
                sliced = self.shared.rebuilder.tensors(generated, buffers=False)
                tensors = dict(module.named_parameters(remove_duplicate=False))
                for name, value in sliced.items():
                    tensors[name].copy_(value)
        return module

    def evaluate_policy(self, keep: np.ndarray, build: Callable[[], nn.Module]) -> ProxyResult:
        return self.scorer.evaluate_owned(self.select(np.asarray(keep, dtype=np.int64)))

    def prepare_policy(self, keep: np.ndarray, build: Callable[[], nn.Module]) -> nn.Module:
        return self.scorer.prepare(self.select(np.asarray(keep, dtype=np.int64)))

    def evaluate(self, model: nn.Module) -> ProxyResult:
        """A model given without its policy is scored as the recalibration proxy scores it."""
        return self.scorer.evaluate(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.scorer.prepare(model)
