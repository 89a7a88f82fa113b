"""Model zoo: CIFAR-style ResNets, VGG-BN, MobileNetV2, a tiny test CNN, and any torchvision model.

``get_model`` accepts a registered name, ``"tv:NAME"`` for torchvision, ``"timm:NAME"`` for timm (either
with ``"@WEIGHTS"`` to start from published weights in the local cache: :mod:`prune_env.models.pretrained`),
an ``nn.Module`` (returned as is) or a zero-argument factory, so a user's own network works wherever a name
does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from prune_env.errors import InvalidSettingError, UnknownNameError
from prune_env.models.cifar_resnet import CifarResNet, resnet
from prune_env.models.mobilenetv2 import MobileNetV2, mobilenetv2
from prune_env.models.pretrained import (
    check_pretrained,
    split_weights,
    timm_pretrained,
    torchvision_pretrained,
)
from prune_env.models.timm_adapter import check_timm_name, timm_model
from prune_env.models.tiny import TinyCNN
from prune_env.models.torchvision_adapter import torchvision_model, torchvision_names
from prune_env.models.vgg import VGG, vgg

# name -> factory(num_classes, in_channels)
ModelFactory = Callable[[int, int], nn.Module]
ModelSpec = str | nn.Module | Callable[[], nn.Module]

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"  # any timm model (optional dependency)

_REGISTRY: dict[str, ModelFactory] = {
    **{f"resnet{d}": partial(resnet, d) for d in (20, 32, 44, 56, 110)},
    **{name: partial(vgg, name) for name in ("vgg11", "vgg16", "vgg19")},
    "vgg11_quarter": partial(vgg, "vgg11", width=0.25),
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_half": partial(mobilenetv2, width=0.5, last_channels=640),
    "tiny": TinyCNN,
}


def register_model(name: str, factory: ModelFactory) -> None:
    """Make ``get_model(name, num_classes, in_channels)`` call ``factory(num_classes, in_channels)``."""
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        raise InvalidSettingError(
            f"names starting with {TORCHVISION_PREFIX!r} or {TIMM_PREFIX!r} are reserved for torchvision "
            "and timm models"
        )
    _REGISTRY[name] = factory


def available_models() -> list[str]:
    """Registered names; any torchvision classifier is also available as ``"tv:NAME"``."""
    return sorted(_REGISTRY)


def get_model(model: ModelSpec, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model for ``num_classes`` classes and ``in_channels`` input channels.

    An ``nn.Module`` is returned unchanged (not copied) and a zero-argument callable is called: the
    user then owns the architecture and its input/output sizes.
    """
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise InvalidSettingError(
                f"model factory {model!r} returned {type(built).__name__}, not an nn.Module"
            )
        return built
    if not isinstance(model, str):
        raise InvalidSettingError(
            f"model must be a name, an nn.Module or a factory, got {type(model).__name__}"
        )
    check_model_name(model)
    model, weights = split_weights(model)
    if weights is not None:
        if model.startswith(TORCHVISION_PREFIX):
            return torchvision_pretrained(model[len(TORCHVISION_PREFIX) :], weights, num_classes, in_channels)
        return timm_pretrained(model[len(TIMM_PREFIX) :], num_classes, in_channels)
    if model.startswith(TORCHVISION_PREFIX):
        return torchvision_model(model[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    if model.startswith(TIMM_PREFIX):
        return timm_model(model[len(TIMM_PREFIX) :], num_classes, in_channels)
    return _REGISTRY[model](num_classes, in_channels)


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownNameError` listing the known names unless ``name`` can be built, and
    :class:`~prune_env.errors.WeightsNotFoundError` when its pretrained weights are not cached."""
    name, weights = split_weights(name)
    if weights is not None and not name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        raise UnknownNameError(
            f"'@{weights}': published weights exist for 'tv:NAME' and 'timm:NAME' models only; a zoo model "
            "is trained here (pass trained weights with --weights PATH)"
        )
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :]
        if tv_name not in torchvision_names():
            raise UnknownNameError(
                f"unknown torchvision model {tv_name!r}; use 'tv:NAME' with NAME one of: "
                + ", ".join(torchvision_names())
            )
    elif name.startswith(TIMM_PREFIX):
        check_timm_name(name[len(TIMM_PREFIX) :])
    elif name not in _REGISTRY:
        raise UnknownNameError(
            f"unknown model {name!r}; known models: {', '.join(available_models())}, "
            f"or 'tv:NAME' for a torchvision model (e.g. 'tv:resnet18'), or pass your own nn.Module"
        )
    if weights is not None:
        prefix = TORCHVISION_PREFIX if name.startswith(TORCHVISION_PREFIX) else TIMM_PREFIX
        check_pretrained(prefix, name[len(prefix) :], weights)


def model_name(model: ModelSpec) -> str:
    """A short human-readable tag (used in cache file names and reports)."""
    if isinstance(model, str):
        return model.replace(":", "-").replace("/", "-")
    if isinstance(model, nn.Module):
        return type(model).__name__
    return getattr(model, "__name__", type(model).__name__)


__all__ = [
    "VGG",
    "CifarResNet",
    "MobileNetV2",
    "ModelFactory",
    "ModelSpec",
    "TinyCNN",
    "available_models",
    "check_model_name",
    "get_model",
    "model_name",
    "register_model",
    "torchvision_model",
    "torchvision_names",
]
