"""Ray, an optional dependency: whether settings ask for it, and a clear error where it is missing.

Kept apart from :mod:`prune_env.distributed` (which imports torch) so that settings can be checked, and
``prune-env --help`` answered, without importing torch.
"""

from __future__ import annotations

from types import ModuleType

from prune_env.errors import InvalidSettingError


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise InvalidSettingError(
            "parallel workers run on Ray, an optional dependency: pip install 'prune-env[ray]' (or pip install ray)"
        ) from None
    return ray


def uses_ray(workers: int | None, address: str | None) -> bool:
    """Whether settings (already checked) ask for Ray: several workers, or a cluster. If they do, Ray must
    be installed, which is checked here, before any work."""
    wanted = (workers is not None and workers > 1) or address is not None
    if wanted:
        import_ray()
    return wanted


__all__ = ["import_ray", "uses_ray"]
