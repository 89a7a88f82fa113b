"""prune_env: structured pruning of neural networks as a Gymnasium reinforcement-learning problem.

The public names below are loaded on first use (PEP 562), so ``import prune_env`` costs little more than
registering the environments, and a command's ``--help`` answers before torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prune_env.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ChannelGroup": "prune_env.graph",
    "DependencyGraph": "prune_env.graph",
    "Member": "prune_env.graph",
    "build_graph": "prune_env.graph",
    "LayerSpec": "prune_env.graph",
    "register_layer": "prune_env.graph",
    "register_opaque": "prune_env.graph",
    "prune": "prune_env.surgery",
    "prune_channels": "prune_env.surgery",
    "count_macs": "prune_env.costs",
    "count_params": "prune_env.costs",
    "load_pruned": "prune_env.checkpoint",
    "save_pruned": "prune_env.checkpoint",
    "ProblemSettings": "prune_env.settings",
    "PruningProblem": "prune_env.problem",
    "LayerPruneEnv": "prune_env.env",
    "OneShotPruneEnv": "prune_env.env",
    "Outcome": "prune_env.rewards",
    "Proxy": "prune_env.proxy",
    "ProxyEvaluator": "prune_env.proxy",
    "ProxyContext": "prune_env.proxy",
    "MetricProxy": "prune_env.metric_proxy",
    "SupernetProxy": "prune_env.supernet",
    "PruningNetProxy": "prune_env.supernet",
    "SupernetConfig": "prune_env.supernet",
    "Splits": "prune_env.data",
    "from_datasets": "prune_env.user_data",
    **{
        name: "prune_env.errors"
        for name in (
            "CheckpointError",
            "DatasetError",
            "DatasetNotFoundError",
            "InvalidActionError",
            "InvalidRatiosError",
            "InvalidSettingError",
            "MetricError",
            "PruneEnvError",
            "ResumeError",
            "RewardError",
            "RunDirectoryError",
            "UnknownNameError",
            "UnsupportedLayerError",
            "UntraceableModelError",
            "WeightsNotFoundError",
        )
    },
}

if TYPE_CHECKING:
    from prune_env.checkpoint import load_pruned, save_pruned
    from prune_env.costs import count_macs, count_params
    from prune_env.data import Splits
    from prune_env.env import LayerPruneEnv, OneShotPruneEnv
    from prune_env.errors import (
        CheckpointError,
        DatasetError,
        DatasetNotFoundError,
        InvalidActionError,
        InvalidRatiosError,
        InvalidSettingError,
        MetricError,
        PruneEnvError,
        ResumeError,
        RewardError,
        RunDirectoryError,
        UnknownNameError,
        UnsupportedLayerError,
        UntraceableModelError,
        WeightsNotFoundError,
    )
    from prune_env.graph import (
        ChannelGroup,
        DependencyGraph,
        LayerSpec,
        Member,
        build_graph,
        register_layer,
        register_opaque,
    )
    from prune_env.metric_proxy import MetricProxy
    from prune_env.problem import PruningProblem
    from prune_env.proxy import Proxy, ProxyContext, ProxyEvaluator
    from prune_env.rewards import Outcome
    from prune_env.settings import ProblemSettings
    from prune_env.supernet import PruningNetProxy, SupernetConfig, SupernetProxy
    from prune_env.surgery import prune, prune_channels
    from prune_env.user_data import from_datasets


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


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
    "DatasetError",
    "DatasetNotFoundError",
    "DependencyGraph",
    "InvalidActionError",
    "InvalidRatiosError",
    "InvalidSettingError",
    "LayerPruneEnv",
    "LayerSpec",
    "Member",
    "MetricError",
    "MetricProxy",
    "OneShotPruneEnv",
    "Outcome",
    "ProblemSettings",
    "Proxy",
    "ProxyContext",
    "ProxyEvaluator",
    "PruneEnvError",
    "PruningNetProxy",
    "PruningProblem",
    "ResumeError",
    "RewardError",
    "RunDirectoryError",
    "Splits",
    "SupernetConfig",
    "SupernetProxy",
    "UnknownNameError",
    "UnsupportedLayerError",
    "UntraceableModelError",
    "WeightsNotFoundError",
    "__version__",
    "build_graph",
    "count_macs",
    "count_params",
    "from_datasets",
    "load_pruned",
    "prune",
    "prune_channels",
    "register_layer",
    "register_opaque",
    "save_pruned",
]
