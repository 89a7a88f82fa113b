"""The settings of a trained proxy (weight-sharing supernet or PruningNet): one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields

from prune_env.errors import InvalidSettingError
from prune_env.validation import check_settings

# Training steps when none are given. On Fashion-MNIST (54k training images, batch 128) 1000 steps are
# 2.4 epochs; a step runs the teacher once and four sub-networks (full, tiniest, two random), about 2.2x
# a base-training step of the full model, so training costs about half the base model's 10 epochs.
DEFAULT_SUPERNET_STEPS = 1000


@dataclass(frozen=True)
class SupernetConfig:
    """How a :class:`~prune_env.supernet.SupernetProxy` or :class:`~prune_env.supernet.PruningNetProxy`
    is trained (the problem's settings give the data, the seed and the scoring).

    Attributes:
        steps: optimiser steps (each on one training batch).
        batch_size: training images per step.
        lr: SGD learning rate (Nesterov momentum 0.9, cosine decay to 0). Training starts from the base
            model's weights, so it is a fine-tune's rate, not a from-scratch one.
        weight_decay: SGD weight decay.
        random_subnets: random sub-networks per step besides the full and the tiniest (sandwich rule).
        temperature, alpha: the logits' distillation loss from the unpruned model
            (:func:`prune_env.train.kd_loss`).
        stages: Stage-wise Pruning's stage boundaries, as module names; ``None`` finds them on the graph
            (the last cut before each change of spatial resolution), ``()`` trains without stages
            (in-place distillation of the logits only). Ignored by the PruningNet.
        meta_hidden: hidden width of each PruningNet weight generator. Ignored by the supernet.
        macs_band: ``(lo, hi)``: random sub-networks are random allocations at a MACs fraction drawn from
            this band (the policies a search at that budget scores) instead of a uniform random fraction
            removed per group (``None``, Stage-wise Pruning's sampling).
    """

    steps: int = DEFAULT_SUPERNET_STEPS
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 0.0
    random_subnets: int = 2
    temperature: float = 4.0
    alpha: float = 0.9
    stages: tuple[str, ...] | None = None
    meta_hidden: int = 32
    macs_band: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        checked = check_settings({k: v for k, v in values.items() if k != "stages"})
        if checked["macs_band"] is not None:
            object.__setattr__(self, "macs_band", checked["macs_band"])
        if self.stages is not None:
            if isinstance(self.stages, str) or not all(isinstance(s, str) for s in self.stages):
                raise InvalidSettingError(
                    f"stages must be a tuple of module names (or None), got {self.stages!r}"
                )
            object.__setattr__(self, "stages", tuple(self.stages))
