"""Surgery: physically smaller copies of a model with chosen channel units removed.

In data-flow order: ``keep`` validates which units stay, ``plan`` computes every slice and size attribute
that needs, ``pruning`` applies a plan to a deep copy (:func:`prune`, :func:`prune_channels`) or zeroes
the units in place (:func:`zero_units`), and ``rebuilder`` re-applies plans to one reused copy for hot
loops (:class:`ModelRebuilder`).
"""

from prune_env.surgery.keep import KeepSpec, UnitIndices
from prune_env.surgery.pruning import prune, prune_channels, zero_units
from prune_env.surgery.rebuilder import ModelRebuilder

__all__ = ["KeepSpec", "ModelRebuilder", "UnitIndices", "prune", "prune_channels", "zero_units"]
