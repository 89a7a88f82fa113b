"""MetaPruning's PruningNet proxy (Liu et al., "MetaPruning: Meta Learning for Automatic Neural Network
Channel Pruning").

A meta network generates the weights of any pruned structure from its encoding: for every weight tensor
sliced by the dependency graph (a convolution's or a linear layer's), a small generator maps the
fraction of its output and input channels the structure keeps to a full-size weight, which is then
cropped to the kept channels (the prefix of each group's ranking). Trained with stochastic structure
sampling (the same sandwich of full, tiniest and random structures as the supernet), by distillation from
the unpruned model; a candidate is scored with the generated weights after BatchNorm recalibration, no
fine-tuning, as in the paper.

Where the paper generates every weight from scratch, a generator here outputs a *correction* to a shared
weight initialised from the base model, with its last layer initialised to zero: before training every
structure gets the base model's weights (the full structure is the base model), and training starts
from a network that already works instead of from random weights.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from prune_env.proxy import ProxyContext
from prune_env.supernet.trained import TrainedProxy
from prune_env.train import kd_loss


class PruningNetProxy(TrainedProxy):
    """Scores policies with a MetaPruning PruningNet trained once per problem (arguments as
    :class:`~prune_env.supernet.SupernetProxy`; ``config.meta_hidden`` is the generators' width)."""

    kind: ClassVar[str] = "pruningnet"

    def setup(self, context: ProxyContext) -> None:
        weights = self.shared.weights
        slicings = self.shared.rebuilder.slicings()
        params = dict(weights.named_parameters())
        # Generated: every parameter of two or more dimensions that some group slices.
        self.generated_names = [
            name for name, slices in slicings.items() if slices and name in params and params[name].dim() >= 2
        ]
        self.dims = {name: dict((d, s) for d, s in slicings[name]) for name in self.generated_names}
        generators = nn.ModuleDict()
        for i, name in enumerate(self.generated_names):
            last = nn.Linear(self.config.meta_hidden, params[name].numel())
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            generators[str(i)] = nn.Sequential(nn.Linear(2, self.config.meta_hidden), nn.ReLU(), last)
        self.generators = generators.to(self.device)
        self._trainable = nn.ModuleDict({"weights": weights, "generators": self.generators})

    def trainable(self) -> nn.Module:
        return self._trainable

    def encoding(self, name: str) -> torch.Tensor:
        """The kept fractions of ``name``'s output and input channels in the selected structure."""
        dims = self.dims[name]
        return torch.tensor(
            [self.shared.slot_fraction(dims[d]) if d in dims else 1.0 for d in (0, 1)],
            device=self.device,
        )

    def generated(self, keep: np.ndarray) -> dict[str, torch.Tensor]:
        params = dict(self.shared.weights.named_parameters())
        out = {}
        for i, name in enumerate(self.generated_names):
            base = params[name]
            out[name] = base + self.generators[str(i)](self.encoding(name)).view_as(base)
        return out

    def subnet_loss(
        self, keep: np.ndarray, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        self.shared.select(keep).train()
        logits = self.shared.forward(x, self.generated(keep))
        return kd_loss(logits, teacher_logits, y, self.config.temperature, self.config.alpha)
