"""prune_env: structured pruning of neural networks as a Gymnasium reinforcement-learning problem."""

from __future__ import annotations

from prune_env.checkpoint import load_pruned
from prune_env.costs import count_macs, count_params
from prune_env.errors import (
    CheckpointError,
    DatasetNotFoundError,
    InvalidActionError,
    InvalidRatiosError,
    InvalidSettingError,
    PruneEnvError,
    ResumeError,
    RewardError,
    RunDirectoryError,
    UnknownNameError,
    UnsupportedLayerError,
    UntraceableModelError,
)
from prune_env.graph import ChannelGroup, DependencyGraph, Member, build_graph
from prune_env.surgery import ModelRebuilder, prune, prune_channels, zero_units

__version__ = "0.1.0"


def _register_envs() -> None:
    import gymnasium

    for env_id, entry in (
        ("prune_env/LayerPrune-v0", "prune_env.env:LayerPruneEnv"),
        ("prune_env/OneShotPrune-v0", "prune_env.env:OneShotPruneEnv"),
    ):
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry)


_register_envs()

__all__ = [
    "ChannelGroup",
    "CheckpointError",
    "DatasetNotFoundError",
    "DependencyGraph",
    "InvalidActionError",
    "InvalidRatiosError",
    "InvalidSettingError",
    "Member",
    "ModelRebuilder",
    "PruneEnvError",
    "ResumeError",
    "RewardError",
    "RunDirectoryError",
    "UnknownNameError",
    "UnsupportedLayerError",
    "UntraceableModelError",
    "__version__",
    "build_graph",
    "count_macs",
    "count_params",
    "load_pruned",
    "prune",
    "prune_channels",
    "zero_units",
]
