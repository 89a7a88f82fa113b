"""Any torchvision classification model as ``"tv:NAME"``, randomly initialised, adapted to the data.

``num_classes`` goes to the constructor (which resizes the classifier); when the data do not have three
channels, the first convolution that reads the image is replaced by one with the same kernel, stride,
padding, dilation, groups and bias but ``in_channels`` inputs. Pretrained weights are never downloaded:
``"tv:NAME@WEIGHTS"`` reads them from torch hub's local cache (:mod:`prune_env.models.pretrained`).
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from prune_env.errors import UnknownNameError, UnsupportedLayerError


def torchvision_names() -> list[str]:
    """Names of torchvision's image-classification constructors (``torchvision.models.list_models``)."""
    import torchvision  # ~1.5 s to import (it loads torch._dynamo): only when a torchvision model is named

    return sorted(torchvision.models.list_models(module=torchvision.models))


def replace_stem(model: nn.Module, in_channels: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """Swap the first 3-channel convolution for a fresh one reading ``in_channels``; returns (old, new)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            # A Conv2d's geometry is a pair of ints (typed as any-length tuples).
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                cast("tuple[int, int]", module.kernel_size),
                stride=cast("tuple[int, int]", module.stride),
                padding=cast("str | tuple[int, int]", module.padding),
                dilation=cast("tuple[int, int]", module.dilation),
                groups=1 if module.groups == 1 else in_channels,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return module, new
    raise UnsupportedLayerError(
        f"{type(model).__name__}: no 3-channel input convolution found to adapt to {in_channels} channels"
    )


def torchvision_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    names = torchvision_names()
    if name not in names:
        raise UnknownNameError(
            f"unknown torchvision model {name!r}; use 'tv:NAME' with NAME one of: {', '.join(names)}"
        )
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if name.startswith(("googlenet", "inception")):
        # Their auxiliary heads make forward() return a tuple in training mode; one output keeps every
        # model in the library a plain image -> logits function. init_weights silences a warning.
        kwargs.update(aux_logits=False, init_weights=True)
    import torchvision

    model = torchvision.models.get_model(name, **kwargs)
    if in_channels != 3:
        replace_stem(model, in_channels)
    return model


# --------------------------------------------------------------------------------------------------------
# How torchvision's own modules map channels, declared once (prune_env.graph.register_layer). Imported by
# the engine the first time it sees a torchvision module.
# --------------------------------------------------------------------------------------------------------


def _resize_vision_transformer(pruned: Any, original: Any) -> None:
    # _process_input reshapes the patch embedding to (n, self.hidden_dim, tokens): the embedding width.
    pruned.hidden_dim = pruned.conv_proj.out_channels


def register_torchvision_layers() -> None:
    """Declare torchvision's modules that use channel counts as literal sizes."""
    from torchvision.models.vision_transformer import VisionTransformer

    from prune_env.graph import LayerSpec, register_layer

    register_layer(VisionTransformer, LayerSpec(resize=_resize_vision_transformer, split_axis=-2))
