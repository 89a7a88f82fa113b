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


class WeightsNotFoundError(PruneEnvError, FileNotFoundError):
    """Published pretrained weights are not in the local cache; the message names the file and how to get it."""


class InvalidSettingError(PruneEnvError, ValueError):
    """A setting (an argument of an environment, problem, agent, harness or CLI option) is out of range or
    of the wrong type; the message names the setting, the value and what is accepted."""


class CheckpointError(PruneEnvError):
    """A saved model directory is missing, incomplete, tampered with or inconsistent with its description."""


class RunDirectoryError(PruneEnvError):
    """A run directory cannot be used: held by another process, holding another run, or not writable."""


class ResumeError(PruneEnvError):
    """A run cannot be resumed as asked: its files disagree with the settings or fail validation."""


class RewardError(PruneEnvError, ValueError):
    """A reward (or shaping) function returned something other than a finite real number."""


class MetricError(PruneEnvError, ValueError):
    """A user's metric (the proxy of :class:`~prune_env.metric_proxy.MetricProxy`) returned something other
    than a finite real number inside the range it declared."""


class InvalidActionError(PruneEnvError, ValueError):
    """An action of the wrong shape or type, or with NaN/inf, was given to an environment."""


class DatasetError(PruneEnvError, ValueError):
    """A dataset's files are there but damaged (truncated, wrong format); the message says which file."""


class LatencyTableError(PruneEnvError, ValueError):
    """A latency table cannot be used here: measured for another model, device, thread count, batch or
    torch version, or not a latency table at all. The message names the difference and what to do."""


class DiskFullError(PruneEnvError, OSError):
    """No space (or no quota) was left to write a file; the message names the file and the space it needed.
    Nothing already on disk was replaced. ``errno`` and ``filename`` are those of the ``OSError``."""

    def __str__(self) -> str:  # OSError would prefix "[Errno 28]"; the message already says it
        return str(self.strerror)
