"""The built-in agents by name: the module that registers each and the optional package it needs, known
without importing the ``agents`` package (which imports torch, and Stable-Baselines3 for its agents).

:mod:`agents.registry` imports the agents themselves; this module only names them, for answers that must
be quick (``prune-env list``). A test holds it equal to what the registry discovers.
"""

from __future__ import annotations

import importlib.util

SB3_AGENTS = ("ppo", "a2c", "sac", "td3", "ddpg", "amc")

AGENT_MODULES: dict[str, str] = {
    "uniform": "agents.baselines",
    "random": "agents.baselines",
    "global": "agents.allocation",
    "knapsack": "agents.allocation",
    "sensitivity": "agents.sensitivity",
    "evolution": "agents.evolution",
    "predictor": "agents.predictor",
    "rlpruner": "agents.rlpruner",
    **{name: "agents.sb3" for name in SB3_AGENTS},
}

# The optional package each module needs beyond the package's own dependencies.
MODULE_NEEDS: dict[str, str] = {"agents.sb3": "stable_baselines3"}


def installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module whose spec is None
        return False


def runnable_agents() -> list[str]:
    """The built-in agents whose optional dependencies are installed, sorted."""
    return sorted(
        name
        for name, module in AGENT_MODULES.items()
        if module not in MODULE_NEEDS or installed(MODULE_NEEDS[module])
    )
