"""prune_env: structured pruning of neural networks as a Gymnasium reinforcement-learning problem."""

from __future__ import annotations

from prune_env.costs import count_macs, count_params
from prune_env.errors import (
    DatasetNotFoundError,
    InvalidRatiosError,
    PruneEnvError,
    UnknownNameError,
    UnsupportedLayerError,
    UntraceableModelError,
)
from prune_env.graph import ChannelGroup, DependencyGraph, Member, build_graph
from prune_env.surgery import prune, prune_channels, zero_units

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup",
    "DatasetNotFoundError",
    "DependencyGraph",
    "InvalidRatiosError",
    "Member",
    "PruneEnvError",
    "UnknownNameError",
    "UnsupportedLayerError",
    "UntraceableModelError",
    "__version__",
    "build_graph",
    "count_macs",
    "count_params",
    "prune",
    "prune_channels",
    "zero_units",
]
