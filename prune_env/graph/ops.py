"""The op tables: which rule maps each function, method and layer type, and how its output shape is found
on the meta pass. Supporting a new op is one entry here.

Every op in these tables has its cost modelled by its rule (convolutions, linear layers) or costs no
multiply-accumulates, so it never runs under the FLOP counter (which would route every tensor op through
Python). An op that is in no table is run under the counter; if it counts MACs, its inputs are frozen and
its cost is a constant. A layer type in no table is a black box that may branch on its input's values, so
a model with one is propagated on real tensors.

Library ops are registered when the library is already loaded (:func:`register_library_ops`, called by
every build), so importing the engine never imports torchvision.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prune_env.graph import meta
from prune_env.graph import rules_attention as attention
from prune_env.graph import rules_functions as fn
from prune_env.graph import rules_modules as mod
from prune_env.graph.context import ModuleRule, Rule

ModuleMetaShape = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class FunctionOp:
    """How a function or tensor method maps channels.

    ``rule``: the channel mapping. ``on_meta``: the output from meta stand-ins of the arguments without
    running the op (or :data:`meta.NOT_COVERED`); None runs the op itself. ``any_value``: the rule also
    handles non-tensor results (sizes, unpacking); other ops returning a plain number count sizes.
    """

    rule: Rule
    on_meta: meta.MetaShape | None = None
    any_value: bool = False


@dataclass(frozen=True)
class ModuleOp:
    """How a layer type maps channels; ``on_meta`` computes its output from meta stand-ins (None: the layer
    is stateless and runs on them as it is)."""

    rule: ModuleRule
    on_meta: ModuleMetaShape | None = None


def _unary_on_meta(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Elementwise on one tensor: the input's shape, unless another argument is a tensor (broadcast)."""
    others = [*args[1:], *kwargs.values()]
    return (
        meta.NOT_COVERED
        if any(isinstance(a, torch.Tensor) for a in others)
        else meta.same_as_input(args, kwargs)
    )


def _convolution_on_meta(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    assert isinstance(m, mod.CONVOLUTIONS)
    value = meta.convolution_module(m, args, kwargs)
    if value is meta.NOT_COVERED:
        value = m._conv_forward(args[0], meta.to_meta(m.weight), meta.to_meta(m.bias))
    return value


def _linear_on_meta(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    assert isinstance(m, nn.Linear)
    x = args[0]
    if (
        isinstance(x, torch.Tensor)
        and x.ndim >= 1
        and x.shape[-1] == m.in_features
        and x.dtype == m.weight.dtype
    ):
        # F.linear has no native meta kernel (its Python decomposition costs ~0.7 ms a call).
        return torch.empty((*x.shape[:-1], m.out_features), dtype=x.dtype, device="meta")
    return F.linear(x, meta.to_meta(m.weight), meta.to_meta(m.bias))


def _multihead_attention_on_meta(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    assert isinstance(m, nn.MultiheadAttention)
    query = args[0]
    need_weights = kwargs.get("need_weights", args[4] if len(args) > 4 else True)
    if not isinstance(query, torch.Tensor) or query.ndim != 3 or need_weights:
        return meta.NOT_COVERED  # attention weights requested: run it (on real tensors if it must)
    return torch.empty_like(query, device="meta"), None


SIZE = FunctionOp(fn.size, any_value=True)
UNARY = FunctionOp(fn.unary, _unary_on_meta)
CAST = FunctionOp(fn.unary)  # dtype or device may change: run it
BINARY = FunctionOp(fn.binary, meta.broadcast_binary)
SPATIAL = FunctionOp(fn.spatial)
MOVE = FunctionOp(fn.reshape)
REDUCE = FunctionOp(fn.reduce, meta.reduced)
SOFTMAX = FunctionOp(fn.softmax)
CAT = FunctionOp(fn.cat, meta.concatenated)
CHUNK = FunctionOp(fn.chunk)

FUNCTION_OPS: dict[Any, FunctionOp] = {
    **dict.fromkeys(("size", "dim", "numel", getattr, "ndimension", torch.numel), SIZE),
    operator.getitem: FunctionOp(fn.getitem, any_value=True),
    **dict.fromkeys((
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
        torch.maximum, torch.minimum,
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "maximum", "minimum",
    ), BINARY),
    torch.where: FunctionOp(fn.binary, meta.broadcast_where),
    **dict.fromkeys((
        F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
        F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus,
        F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clamp,
        torch.clip, torch.exp, torch.abs, torch.neg, operator.neg, torch.square, torch.sqrt, torch.rsqrt,
        torch.erf, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip", "exp", "abs",
        "neg", "clone", "detach", "contiguous", "square", "sqrt", "hardtanh_", "hardswish_",
    ), UNARY),
    **dict.fromkeys(("float", "double", "half", "to", "type_as", "pow"), CAST),
    **dict.fromkeys((
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d,
        F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate, F.upsample,
    ), SPATIAL),
    F.adaptive_avg_pool1d: FunctionOp(fn.spatial, meta.adaptive_pool(1)),
    F.adaptive_avg_pool2d: FunctionOp(fn.spatial, meta.adaptive_pool(2)),
    F.adaptive_avg_pool3d: FunctionOp(fn.spatial, meta.adaptive_pool(3)),
    **dict.fromkeys((
        *fn.RESHAPES, "permute", torch.permute, "transpose", torch.transpose, "unsqueeze", torch.unsqueeze,
        "squeeze", torch.squeeze, "flatten", torch.flatten, "movedim", torch.movedim, "expand", "t",
        "unflatten",
    ), MOVE),
    **dict.fromkeys(("mean", torch.mean, "sum", torch.sum, "amax", torch.amax, "amin", torch.amin), REDUCE),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax"), SOFTMAX),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), CAT),
    torch.stack: FunctionOp(fn.stack),
    **dict.fromkeys(("chunk", torch.chunk, "split", torch.split), CHUNK),
    **dict.fromkeys((operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm"), FunctionOp(attention.matmul)),
    F.scaled_dot_product_attention: FunctionOp(attention.scaled_dot_product_attention),
    **dict.fromkeys(("unbind", torch.unbind), FunctionOp(attention.unbind)),
    **dict.fromkeys(("roll", torch.roll), FunctionOp(attention.roll)),
    F.layer_norm: FunctionOp(fn.layer_norm, meta.same_as_input),
    F.batch_norm: FunctionOp(fn.batch_norm, meta.same_as_input),
    **dict.fromkeys((F.pad, "pad"), FunctionOp(fn.pad)),
}  # fmt: skip

ELEMENTWISE = ModuleOp(mod.elementwise, meta.module_same_as_input)
SPATIAL_LAYER = ModuleOp(mod.spatial)
POOL_LAYER = ModuleOp(mod.spatial, meta.pool_module)
ADAPTIVE_POOL_LAYER = ModuleOp(mod.spatial, meta.adaptive_pool_module)
NORM = ModuleOp(mod.norm, meta.module_same_as_input)

MODULE_OPS: dict[type[nn.Module], ModuleOp] = {
    **dict.fromkeys(mod.CONVOLUTIONS, ModuleOp(mod.convolution, _convolution_on_meta)),
    **dict.fromkeys(mod.TRANSPOSED_CONVOLUTIONS, ModuleOp(mod.transposed_convolution)),
    **dict.fromkeys(mod.PADDINGS, ModuleOp(mod.padding)),
    nn.Linear: ModuleOp(mod.linear, _linear_on_meta),
    nn.MultiheadAttention: ModuleOp(mod.multihead_attention, _multihead_attention_on_meta),
    **dict.fromkeys((
        nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
        nn.PReLU,
    ), NORM),
    **dict.fromkeys((nn.Flatten, nn.Unflatten), ModuleOp(mod.flatten)),
    nn.ChannelShuffle: ModuleOp(mod.channel_shuffle),
    **dict.fromkeys((nn.Softmax, nn.LogSoftmax, nn.Softmax2d), ModuleOp(mod.softmax, meta.module_same_as_input)),
    **dict.fromkeys((
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
        nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold,
        nn.LogSigmoid,
    ), ELEMENTWISE),
    **dict.fromkeys((
        nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
        nn.ReflectionPad2d, nn.ReplicationPad2d,
    ), SPATIAL_LAYER),
    **dict.fromkeys(
        (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), POOL_LAYER
    ),
    **dict.fromkeys((
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    ), ADAPTIVE_POOL_LAYER),
}  # fmt: skip


# Library layer types the tracer keeps whole because a rule above maps them (exact types: a subclass may
# compute differently).
LIBRARY_LEAVES: set[type[nn.Module]] = set()


def module_op(layer_type: type) -> ModuleOp | None:
    """The entry for ``layer_type`` or its nearest base class that has one (a subclass of a torch layer,
    such as a declared ``like=nn.Conv2d`` layer, maps like it)."""
    for cls in layer_type.__mro__:
        op = MODULE_OPS.get(cls)
        if op is not None:
            return op
    return None


def register_library_ops() -> None:
    """Add the ops of optional libraries that are already loaded (a model calling them loaded them)."""
    tv_ops = sys.modules.get("torchvision.ops")
    stochastic_depth = getattr(tv_ops, "stochastic_depth", None)
    if stochastic_depth is not None and stochastic_depth not in FUNCTION_OPS:
        FUNCTION_OPS[stochastic_depth] = UNARY  # a per-sample mask: channels pass through unchanged
    # torchvision's RoI pooling (detectors' box, mask and keypoint heads): output channel c is input
    # channel c pooled over each box. The multi-scale pooler is a leaf: it writes each level's pooled boxes
    # into a buffer sized by a literal channel count, which would freeze every feature level's channels.
    roi_align = getattr(getattr(torch.ops, "torchvision", None), "roi_align", None)
    if tv_ops is not None and roi_align is not None and roi_align not in FUNCTION_OPS:
        roi_pool = torch.ops.torchvision.roi_pool
        for op in (roi_align, roi_align.default, roi_pool, tv_ops.roi_align, tv_ops.roi_pool):
            FUNCTION_OPS[op] = SPATIAL
        MODULE_OPS[tv_ops.MultiScaleRoIAlign] = ModuleOp(mod.multiscale_roi_pool)
        LIBRARY_LEAVES.add(tv_ops.MultiScaleRoIAlign)
    # torchvision's Swin attention (V1 and V2) passes its weights to a function fx cannot trace (it pads and
    # shifts by the input size): leaves with their own rule.
    swin = sys.modules.get("torchvision.models.swin_transformer")
    if swin is not None and swin._patch_merging_pad not in FUNCTION_OPS:
        for attention_type in (swin.ShiftedWindowAttention, swin.ShiftedWindowAttentionV2):
            MODULE_OPS[attention_type] = ModuleOp(mod.window_attention, meta.module_same_as_input)
            LIBRARY_LEAVES.add(attention_type)
        FUNCTION_OPS[swin._patch_merging_pad] = FunctionOp(fn.tiled_channels)
    # timm's attention helpers, which it keeps out of traces: adding an optional mask to the scores, and
    # building that mask from sizes and the caller's mask (no channels of its own).
    timm_attention = sys.modules.get("timm.layers.attention")
    add_mask = getattr(timm_attention, "maybe_add_mask", None)
    if timm_attention is not None and add_mask is not None and add_mask not in FUNCTION_OPS:
        FUNCTION_OPS[add_mask] = FunctionOp(fn.binary, any_value=True)
        FUNCTION_OPS[timm_attention.resolve_self_attn_mask] = FunctionOp(fn.no_channels, any_value=True)
