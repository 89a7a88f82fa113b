"""Stage-wise Pruning's supernet proxy (Zhang et al., "Pruning by stage-wise supernet").

One weight-sharing supernet over the kept counts of every channel group, made from the base model
itself (no hand-written supernet): a sub-network keeps a prefix of each group's ranking, so a policy
selects a slice of the shared weights. Training, per step: the full, the tiniest and random sub-networks
(sandwich rule), each trained by in-place distillation *per stage*: at every stage boundary the
sub-network's output is compared with the unpruned model's there (on the channels it keeps) and the
next stage is fed the unpruned model's features, so each stage-wise supernet learns with few candidates,
independently of the others' choices; the last stage distils the logits. A policy is scored by its
sub-network's accuracy after BatchNorm recalibration; :meth:`SupernetProxy.stage_loss` gives the
alternative score (the summed stage losses) for comparison.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from prune_env.batches import take
from prune_env.proxy import ProxyContext
from prune_env.supernet.stages import StageBoundary, find_boundaries
from prune_env.supernet.subnets import StageTaps
from prune_env.supernet.trained import TrainedProxy
from prune_env.train import EVAL_BATCH_SIZE, kd_loss

# Validation samples the stage-loss score uses (the teacher's features on them are kept in memory).
STAGE_LOSS_SAMPLES = 500


class SupernetProxy(TrainedProxy):
    """Scores policies with Stage-wise Pruning's weight-sharing supernet, trained once per problem.

    Args:
        context: the problem's base model, graph, rankings, data and settings
            (:class:`~prune_env.proxy.ProxyContext`).
        config: training settings (:class:`~prune_env.supernet.SupernetConfig`); ``config.stages``
            overrides the stage boundaries found on the graph.
        cache: the cache directory (default ``$PRUNE_ENV_CACHE``, else ``~/.cache/prune_env``); the
            trained supernet is kept in its ``proxies/``.
        use_cache: load a supernet trained before from the cache, and save a newly trained one there.

    ``boundaries`` lists the stage boundaries used (empty: one stage, the logits only).
    """

    kind: ClassVar[str] = "supernet"

    def setup(self, context: ProxyContext) -> None:
        # Found on the proxy's own copy (the teacher), which a shape probe may put in eval mode.
        self.boundaries: list[StageBoundary] = find_boundaries(
            self.teacher, context.graph, context.example_inputs, modules=self.config.stages
        )
        self.taps = StageTaps(self.teacher, self.shared, self.boundaries)
        n_val = len(context.data.val)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(n_val, generator=generator)[: min(STAGE_LOSS_SAMPLES, n_val)].sort().values
        self._val_x = take(context.data.val, idx)[0]

    def trainable(self) -> nn.Module:
        return self.shared.weights

    def record_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.taps.record(self.teacher, x)

    def subnet_loss(
        self, keep: np.ndarray, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        self.shared.select(keep).train()
        logits, stage_losses = self.taps.substitute(lambda: self.shared.forward(x))
        loss = kd_loss(logits, teacher_logits, y, self.config.temperature, self.config.alpha)
        return loss + sum(stage_losses, torch.zeros((), device=loss.device))

    @torch.no_grad()
    def stage_loss(self, keep: np.ndarray) -> float:
        """The summed stage-wise distillation losses of ``keep``'s sub-network on a fixed validation subset
        (each stage fed the unpruned model's features; BatchNorm on batch statistics, so no stale
        statistics enter): lower is better."""
        module = self.select(np.asarray(keep, dtype=np.int64))
        module.train()
        total, n = 0.0, len(self._val_x)
        for i in range(0, n, EVAL_BATCH_SIZE):
            x = self._val_x[i : i + EVAL_BATCH_SIZE].to(self.device)
            teacher_logits = self.taps.record(self.teacher, x)
            logits, losses = self.taps.substitute(lambda x=x: module(x))
            batch = kd_loss(logits, teacher_logits, None, self.config.temperature) + sum(losses, 0.0)
            total += float(batch) * len(x)
        module.eval()
        return total / max(n, 1)
