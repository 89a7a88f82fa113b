"""Any timm model as ``"timm:NAME"``, randomly initialised (timm is an optional dependency).

``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)`` builds it: timm adapts its own
stem and classifier. Pretrained weights are never downloaded: ``"timm:NAME@pretrained"`` reads them from the
local caches (:mod:`prune_env.models.pretrained`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from torch import nn

from prune_env.errors import InvalidSettingError, UnknownNameError


def import_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise InvalidSettingError(
            "timm models need the optional dependency timm: pip install 'prune-env[timm]' (or pip install timm)"
        ) from None
    return timm


def timm_names() -> list[str]:
    """Names timm can build (``timm.list_models()``)."""
    return sorted(import_timm().list_models())


def check_timm_name(name: str) -> None:
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:10]
        raise UnknownNameError(
            f"unknown timm model {name!r}; use 'timm:NAME' with NAME one of timm.list_models()"
            + (f", e.g. {', '.join(close)}" if close else "")
        )


def timm_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    check_timm_name(name)
    return import_timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


# --------------------------------------------------------------------------------------------------------
# How timm's own layers map channels, declared once (prune_env.graph.register_layer). Imported by the
# engine the first time it sees a timm module, so a model built with timm directly is covered too.
# --------------------------------------------------------------------------------------------------------


def _last_conv(module: nn.Module) -> nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def _resize_selective_kernel(module: nn.Module, original: nn.Module) -> None:
    # forward splits its input into num_paths parts of in_channels // num_paths channels each.
    pruned: Any = module  # a timm SelectiveKernel (its attributes are not typed on nn.Module)
    conv = pruned.paths[0].conv
    pruned.in_channels = conv.in_channels * (pruned.num_paths if pruned.split_input else 1)
    pruned.out_channels = conv.out_channels


def _resize_mixed_conv(module: nn.Module, original: nn.Module) -> None:
    # forward splits its input by self.splits, one part per sub-convolution.
    pruned: Any = module  # a timm MixedConv2d (an nn.ModuleDict)
    convs = list(pruned.values())
    pruned.splits = [c.in_channels for c in convs]
    pruned.in_channels = sum(pruned.splits)
    pruned.out_channels = sum(c.out_channels for c in convs)


def _ghost_width(module: Any) -> int:
    return int(_last_conv(module.primary_conv).out_channels + _last_conv(module.cheap_operation).out_channels)


def _resize_ghost(pruned: Any, original: Any) -> None:
    # forward returns cat([primary, cheap])[:, :out_chs]: the engine prunes it only when that slice is the
    # whole concatenation, which it must then stay; a partial slice froze the channels, so keep it as is.
    if original.out_chs == _ghost_width(original):
        pruned.out_chs = _ghost_width(pruned)


def _resize_heads(pruned: Any, original: Any) -> None:
    # forward reshapes qkv to (3, self.num_heads, head_dim) and the heads' outputs back to num_heads ×
    # head_dim features: the engine prunes whole heads, so head_dim stays and the head count follows proj.
    head_dim = original.proj.in_features // original.num_heads
    pruned.num_heads = pruned.proj.in_features // head_dim
    if hasattr(pruned, "attn_dim"):
        pruned.attn_dim = pruned.proj.in_features


def register_timm_layers() -> None:
    """Declare timm's layers (called by the engine when a model contains one)."""
    from timm.layers.attention import Attention
    from timm.layers.blur_pool import BlurPool2d
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.eca import CecaModule, EcaModule
    from timm.layers.linear import Linear
    from timm.layers.mixed_conv2d import MixedConv2d
    from timm.layers.norm_act import BatchNormAct2d, GroupNormAct
    from timm.layers.selective_kernel import SelectiveKernel
    from timm.layers.split_attn import SplitAttn
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    from timm.models.ghostnet import GhostModule, GhostModuleV2
    from timm.models.swin_transformer import WindowAttention

    from prune_env.graph import LayerSpec, register_layer, register_opaque

    # nn.Linear with a forward that casts for TorchScript (LCNet's and others' classifiers): one node as
    # nn.Linear is, instead of a traced F.linear whose weight gets an id per element (1.28 M for LCNet's).
    register_layer(Linear, LayerSpec(like=nn.Linear))
    # Convolutions that pad from the input size or standardise their weights: channels as nn.Conv2d.
    plain_convs: tuple[type[nn.Conv2d], ...] = (Conv2dSame, StdConv2d, StdConv2dSame)
    for conv in plain_convs:
        register_layer(conv, LayerSpec(like=nn.Conv2d))
    scaled_convs: tuple[type[nn.Conv2d], ...] = (ScaledStdConv2d, ScaledStdConv2dSame)
    for conv in scaled_convs:
        register_layer(conv, LayerSpec(like=nn.Conv2d, tensors={"gain": 0}))
    # BatchNorm fused with an activation and dropout, both element-wise: channels as nn.BatchNorm2d. As a
    # black box it is one node instead of the half-dozen its traced forward makes, in every block of the
    # efficientnet, mobilenetv3, regnet ... families.
    register_layer(BatchNormAct2d, LayerSpec(like=nn.BatchNorm2d))
    # GroupNorm fused with an activation (BiT's ResNetV2, NFNets' relatives): as nn.GroupNorm, whose rule
    # removes whole normalisation groups, so the statistics of the groups that stay are unchanged.
    register_layer(GroupNormAct, LayerSpec(like=nn.GroupNorm))
    # Per-channel blur (a depthwise filter) and channel attention computed from the channels themselves.
    register_layer(BlurPool2d, LayerSpec(channelwise=True, tensors={"filt": 0}, sizes=("channels",)))
    for attention in (EcaModule, CecaModule):
        register_layer(attention, LayerSpec(channelwise=True))
    # Traced, with literal split sizes / slice bounds recomputed from the pruned sub-layers.
    register_layer(SelectiveKernel, LayerSpec(resize=_resize_selective_kernel))
    register_layer(MixedConv2d, LayerSpec(resize=_resize_mixed_conv))
    for ghost in (GhostModule, GhostModuleV2):
        register_layer(ghost, LayerSpec(resize=_resize_ghost))
    # Split attention (ResNeSt) sums its radix groups position by position: its grouped convolution
    # narrows every group alike instead of losing whole groups.
    register_layer(SplitAttn, LayerSpec(groups="alike"))
    # Multi-head attention (ViT, DeiT, Swin): traced, pruned by whole heads, the head count recomputed.
    heads: tuple[type[nn.Module], ...] = (Attention, WindowAttention)
    for layer in heads:
        register_layer(layer, LayerSpec(resize=_resize_heads, split_axis=-2))
    # MobileViT's blocks size their patch grid with Python arithmetic: traced through a twin of their
    # forward whose two size-dependent steps are single ops moving the channels between axes.
    from timm.models.mobilevit import MobileVitBlock

    from prune_env.graph.ops import FUNCTION_OPS, FunctionOp
    from prune_env.models import timm_mobilevit as mobilevit

    register_layer(MobileVitBlock, LayerSpec(trace_as=mobilevit.trace_mobilevit_block))
    FUNCTION_OPS[mobilevit.to_patches] = FunctionOp(mobilevit.patches_rule)
    FUNCTION_OPS[mobilevit.from_patches] = FunctionOp(mobilevit.unpatches_rule)
    # Layers timm itself marks as not traceable (sizes used in Python control flow): black boxes where fx
    # fails on them, instead of refusing the model.
    from timm.layers._fx import get_notrace_modules

    for layer in get_notrace_modules():
        register_opaque(layer)
