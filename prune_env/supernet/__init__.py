"""Trained proxies: weight-sharing sub-networks of the base model score thousands of policies cheaply.

In data-flow order: ``stages`` finds Stage-wise Pruning's stage boundaries on the traced graph,
``subnets`` selects sub-networks of shared weights by kept counts (with autograd for training),
``config`` holds the training settings, ``trained`` trains, caches and scores, and ``stagewise``
(:class:`SupernetProxy`) and ``pruningnet`` (:class:`PruningNetProxy`) are the two proxies.
"""

from prune_env.supernet.config import DEFAULT_SUPERNET_STEPS, SupernetConfig
from prune_env.supernet.pruningnet import PruningNetProxy
from prune_env.supernet.stages import StageBoundary, find_boundaries
from prune_env.supernet.stagewise import SupernetProxy
from prune_env.supernet.trained import TrainedProxy

__all__ = [
    "DEFAULT_SUPERNET_STEPS",
    "PruningNetProxy",
    "StageBoundary",
    "SupernetConfig",
    "SupernetProxy",
    "TrainedProxy",
    "find_boundaries",
]
