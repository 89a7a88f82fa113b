"""Typed errors. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class PruneEnvError(Exception):
    """Base class of every error raised by prune_env."""


class UntraceableModelError(PruneEnvError):
    """torch.fx could not trace the model; the message names the module and how to mark it as a leaf."""


class UnsupportedLayerError(PruneEnvError):
    """A layer or operation the engine cannot handle was asked to do something it cannot do."""


class InvalidRatiosError(PruneEnvError, ValueError):
    """Pruning ratios of the wrong shape, range or group names."""


class UnknownNameError(PruneEnvError, KeyError):
    """An unknown model, dataset, agent or reward name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message, adding quotes
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(PruneEnvError, FileNotFoundError):
    """The dataset's files are not where we looked; the message says how to get them."""
