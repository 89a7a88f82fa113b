"""Rules for layers (``call_module`` nodes): the dimensions each layer's weights run along, and its MACs.

A layer registers its dimensions as slots (output channels found a new channel space; input channels and
per-channel parameters follow their input's elements), records how each parameter's size depends on them,
and models its MACs as ``coef × Π kept(slot)``. Layers declared channel-wise (:class:`LayerSpec`) are
black boxes calibrated here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prune_env.errors import UnsupportedLayerError
from prune_env.graph.context import Call, Context, Mapped
from prune_env.graph.elements import along, channel_vector, poison_like
from prune_env.graph.layers import LayerSpec, layer_spec, shrink_channelwise, spec_tensors
from prune_env.graph.meta import meta_call, to_meta
from prune_env.graph.rules_functions import padded, reshape_ids, spatial_ids

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PADDINGS = tuple(
    getattr(nn, f"{kind}Pad{d}d")
    for kind in ("Constant", "Zero", "Reflection", "Replication", "Circular")
    for d in (1, 2, 3)
    if hasattr(nn, f"{kind}Pad{d}d")
)


def elementwise(ctx: Context, c: Call, m: nn.Module) -> Mapped:
    return Mapped(c.first)


def spatial(ctx: Context, c: Call, m: nn.Module) -> Mapped:
    return Mapped(spatial_ids(ctx, c.node, c.value, c.first))


def padding(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """``nn.ConstantPad2d``, ``nn.ZeroPad2d``, ``nn.ReflectionPad2d``... : as ``F.pad`` with their widths."""
    return padded(c.first, m.padding)  # type: ignore[arg-type]  # a tuple: these layers expand an int


def multiscale_roi_pool(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """torchvision's ``MultiScaleRoIAlign(x: dict of feature maps, boxes, image_shapes)``: each box is
    pooled from one pyramid level, channel ``c`` of the output from channel ``c`` of that level, so the
    levels it reads share their channels."""
    features = c.id_args[0] if c.id_args else c.id_kwargs.get("x")
    if not isinstance(features, dict):
        return None
    names = [k for k in getattr(m, "featmap_names", ()) if k in features]  # as the pooler filters them
    if not names:
        return None
    found = [channel_vector(features[k], 1) for k in names]
    vectors = [v for v in found if v is not None]
    if len(vectors) != len(found) or len({int(v.numel()) for v in vectors}) != 1:
        return None
    for v in vectors[1:]:
        ctx.state.union(vectors[0], v)
    return Mapped(along(vectors[0], 1, c.value.ndim))


def convolution(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """Output channels found a channel space; a grouped conv removes whole groups, or, inside a module
    declared ``LayerSpec(groups="alike")``, the same positions of every group."""
    assert isinstance(m, CONVOLUTIONS)
    st, n, x, value = ctx.state, c.node, c.first, c.value
    if not isinstance(x, torch.Tensor):
        return None
    name: str = n.target  # type: ignore[assignment]
    tname = type(m).__name__
    vin = channel_vector(x, 1)
    if vin is None:
        st.poison(x, n, f"{tname} {name!r} reads a tensor whose channels are not on axis 1")
        vin = torch.zeros(m.in_channels, dtype=torch.int64)
    vin = vin.expand(m.in_channels)
    g = m.groups
    spec = ctx.enclosing_spec(n) if g > 1 else None
    alike = spec is not None and spec.groups == "alike"
    slots: tuple[int, ...]
    # A grouped conv's outputs are derived from its inputs (whole groups go together), so they
    # belong to the input's producers' groups rather than founding one.
    out_slot, vout = st.out_slot(name, tname, m.out_channels, 0, producer=g == 1 or alike)
    if alike:
        # Position j of every group is one unit, on both sides: each group narrows alike; the weight's
        # input dim indexes the positions within a group.
        vin_g, vout_g = vin.reshape(g, -1), vout.reshape(g, -1)
        st.union(vin_g, vin_g[:1])
        st.union(vout_g, vout_g[:1])
        in_slot = st.slot(name, tname, "in", 1, vin_g[0])
        st.use_param(f"{name}.weight", m.weight, {0: out_slot, 1: in_slot})
        divisor, slots = m.out_channels * (m.in_channels // g), (out_slot, in_slot)
    elif g > 1:
        # Grouped/depthwise: remove whole groups, so a group's inputs and outputs are one unit.
        st.slot(name, tname, "in", 1, vin)
        vin_g = vin.reshape(g, -1)
        vout_g = vout.reshape(g, -1)
        st.union(vin_g, vout_g[:, :1])
        st.union(vout_g, vout_g[:, :1])
        st.use_param(f"{name}.weight", m.weight, {0: out_slot})
        divisor, slots = m.out_channels, (out_slot,)
    else:
        in_slot = st.slot(name, tname, "in", 1, vin)
        st.use_param(f"{name}.weight", m.weight, {0: out_slot, 1: in_slot})
        divisor, slots = m.out_channels * m.in_channels, (out_slot, in_slot)
    # FlopCounterMode's convolution formula: batch × output pixels × weight numel (bias not counted).
    total = value.shape[0] * m.weight.numel() * math.prod(value.shape[2:])
    if m.bias is not None:
        st.use_param(f"{name}.bias", m.bias, {0: out_slot})
    _declared_tensors(ctx, name, m, out_slot, m.out_channels)
    return Mapped(along(vout, 1, value.ndim), [(total // divisor, slots)])


def transposed_convolution(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """A transposed convolution (a mask head's upsampling): its weight is ``(in, out, *kernel)``, so the
    channels it founds are on the weight's axis 1. Grouped ones are kept whole (None: not mapped)."""
    assert isinstance(m, TRANSPOSED_CONVOLUTIONS)
    st, n, x, value = ctx.state, c.node, c.first, c.value
    if not isinstance(x, torch.Tensor) or m.groups != 1 or len(c.id_args) != 1 or c.id_kwargs:
        return None  # grouped, or given an output size: kept whole
    name: str = n.target  # type: ignore[assignment]
    tname = type(m).__name__
    vin = channel_vector(x, 1)
    if vin is None:
        return None
    out_slot, vout = st.out_slot(name, tname, m.out_channels, 1, producer=True)
    in_slot = st.slot(name, tname, "in", 0, vin.expand(m.in_channels))
    st.use_param(f"{name}.weight", m.weight, {1: out_slot, 0: in_slot})
    if m.bias is not None:
        st.use_param(f"{name}.bias", m.bias, {0: out_slot})
    # FlopCounterMode's transposed formula: batch × INPUT pixels × weight numel (bias not counted).
    pixels = c.args[0].shape
    total = pixels[0] * m.weight.numel() * math.prod(pixels[2:])
    return Mapped(
        along(vout, 1, value.ndim), [(total // (m.out_channels * m.in_channels), (out_slot, in_slot))]
    )


def linear(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    assert isinstance(m, nn.Linear)
    st, n, x, value = ctx.state, c.node, c.first, c.value
    if not isinstance(x, torch.Tensor):
        return None
    name: str = n.target  # type: ignore[assignment]
    tname = type(m).__name__
    vin = channel_vector(x, -1)
    if vin is None:
        st.poison(x, n, f"Linear {name!r} reads a tensor whose features vary along several axes")
        vin = torch.zeros(m.in_features, dtype=torch.int64)
    in_slot = st.slot(name, tname, "in", 1, vin.expand(m.in_features))
    out_slot, vout = st.out_slot(name, tname, m.out_features, 0)
    st.use_param(f"{name}.weight", m.weight, {0: out_slot, 1: in_slot})
    if m.bias is not None:
        st.use_param(f"{name}.bias", m.bias, {0: out_slot})
    _declared_tensors(ctx, name, m, out_slot, m.out_features)
    rows = math.prod(c.args[0].shape[:-1])  # MACs: rows × out_features × in_features
    return Mapped(along(vout, -1, value.ndim), [(rows, (out_slot, in_slot))])


def _declared_tensors(ctx: Context, name: str, m: nn.Module, slot: int, size: int) -> None:
    """Extra tensors a ``like=`` declaration says follow the layer's output channels (slot ``slot``)."""
    spec = layer_spec(type(m))
    if spec is not None and spec.like is not None:
        for path, t, dim in spec_tensors(m, spec, size):
            ctx.state.use_param(f"{name}.{path}", t, {dim: slot})


def norm(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """BatchNorm, InstanceNorm, GroupNorm (whole groups), LayerNorm over one axis, PReLU."""
    st, n, x = ctx.state, c.node, c.first
    if not isinstance(x, torch.Tensor):
        return None
    name, tname = n.target, type(m).__name__
    if isinstance(m, nn.PReLU):
        if m.num_parameters == 1:
            return Mapped(x)
        axis, size = 1, m.num_parameters
    elif isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            st.poison(x, n, f"LayerNorm {name!r} normalises over several axes")
            return Mapped(x)
        axis, size = -1, m.normalized_shape[0]
    elif isinstance(m, nn.GroupNorm):
        axis, size = 1, m.num_channels
    else:
        axis, size = 1, m.num_features  # type: ignore[assignment]
    v = channel_vector(x, axis)
    if v is None:
        st.poison(x, n, f"{tname} {name!r} reads a tensor whose channels are not on one axis")
        return Mapped(x)
    v = v.expand(size)
    if isinstance(m, nn.GroupNorm):
        # Remove whole normalisation groups: channels of one group form one unit.
        vg = v.reshape(m.num_groups, -1)
        st.union(vg, vg[:, :1])
    slot = st.slot(str(name), tname, "channel", 0, v)
    for pname, p in m.named_parameters(recurse=False):
        st.use_param(f"{name}.{pname}", p, {0: slot})
    for bname in ("running_mean", "running_var"):  # sliced by surgery along with the parameters
        buffer = m._buffers.get(bname)
        if buffer is not None:
            st.use_tensor(f"{name}.{bname}", buffer, {0: slot})
    return Mapped(x)


@dataclass
class _Heads:
    """The slots of self-attention that sizes its heads from its input's width (see
    :func:`_attention_heads`)."""

    in_slot: int  # the q/k/v projection's inputs
    rows_slot: int  # its output rows, (3, heads, head_dim)
    head_ids: torch.Tensor  # one element per head
    proj_in: int
    proj_out: int
    out_ids: torch.Tensor  # the output projection's rows: the attention's output features


def _attention_heads(
    ctx: Context, c: Call, qkv: tuple[str, str], proj: str, heads: int, width: int, *, output_as_input: bool
) -> _Heads | None:
    """Slots of attention whose heads are sized by its input's width (``head_dim = C // heads``): inner
    position ``j`` of q, k, v and of the projection's inputs goes with input channel ``j``, and a head's
    positions are one unit; with ``output_as_input`` (the output is viewed with the input's width again)
    output feature ``j`` is input channel ``j`` too. ``qkv``: the (layer, type) of the q/k/v projection;
    ``proj``: the output projection's layer (a Linear). None, with the input poisoned, when its features
    vary along several axes."""
    st, n, x = ctx.state, c.node, c.first
    vin = channel_vector(x, -1)
    if vin is None:
        st.poison(x, n, f"{ctx.describe(n)} reads a tensor whose features vary along several axes")
        return None
    vin = vin.expand(width)
    head_dim = width // heads
    in_slot = st.slot(*qkv, "in", 1, vin)
    rows_slot, rows = st.out_slot(*qkv, 3 * width, 0, producer=False)
    grid = rows.reshape(3, heads, head_dim)
    st.union(grid, vin.reshape(1, heads, head_dim))
    st.union(grid, grid[:, :, :1])
    proj_in = st.slot(proj, "Linear", "in", 1, vin)
    proj_out, vout = st.out_slot(proj, "Linear", width, 0)
    if output_as_input:
        st.union(vout, vin)
    return _Heads(in_slot, rows_slot, grid[0, :, 0], proj_in, proj_out, vout)


def multihead_attention(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """``nn.MultiheadAttention`` as self-attention (query, key and value one tensor), pruned by whole heads.

    Its forward sizes each head from the *query's* width (``head_dim = embed_dim // num_heads``), so the
    attention's inner width is its input width: inner position ``j`` of q, k, v and of the output
    projection's inputs goes with input channel ``j``, and a head's positions are one unit. Pruning a head
    removes it and its ``head_dim`` channels of the embedding it reads."""
    assert isinstance(m, nn.MultiheadAttention)
    st, n, value = ctx.state, c.node, c.value
    names = ("query", "key", "value")
    nodes = [n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in enumerate(names)]
    x = c.first
    if (
        not isinstance(x, torch.Tensor)
        or not (nodes[0] is nodes[1] is nodes[2])
        or not m._qkv_same_embed_dim
        or m.bias_k is not None
        or m.add_zero_attn
        or m.in_proj_weight is None
    ):
        return None  # cross-attention or extra key/value biases: frozen (with a warning)
    name, proj = str(n.target), f"{n.target}.out_proj"
    h = _attention_heads(
        ctx, c, (name, type(m).__name__), proj, m.num_heads, m.embed_dim, output_as_input=False
    )
    if h is None:
        return None
    in_slot, rows_slot, proj_in, proj_out = h.in_slot, h.rows_slot, h.proj_in, h.proj_out
    st.use_param(f"{name}.in_proj_weight", m.in_proj_weight, {0: rows_slot, 1: in_slot})
    if m.in_proj_bias is not None:
        st.use_param(f"{name}.in_proj_bias", m.in_proj_bias, {0: rows_slot})
    st.use_param(f"{proj}.weight", m.out_proj.weight, {0: proj_out, 1: proj_in})
    if m.out_proj.bias is not None:
        st.use_param(f"{proj}.bias", m.out_proj.bias, {0: proj_out})
    query, key = c.args[0], c.args[1]
    batch_axis = 0 if m.batch_first else 1
    tokens = query.shape[1 - batch_axis] if query.ndim == 3 else query.shape[0]
    sources = key.shape[1 - batch_axis] if key.ndim == 3 else key.shape[0]
    batch = query.shape[batch_axis] if query.ndim == 3 else 1
    rows_count = batch * tokens
    # in_proj (rows × 3E × E), q kᵀ and attn v (2 × batch × tokens × sources × E), out_proj (rows × E × E).
    macs = [
        (rows_count, (rows_slot, in_slot)),
        (2 * batch * tokens * sources, (in_slot,)),
        (rows_count, (proj_out, proj_in)),
    ]
    out = along(h.out_ids, -1, query.ndim)
    weights = value[1] if isinstance(value, tuple) and len(value) > 1 else None
    return Mapped((out, poison_like(weights)), macs)


def window_attention(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """torchvision's Swin ``ShiftedWindowAttention`` and its V2 (black boxes: their forward hands the weights
    to a function fx cannot trace, whose padding and shift depend on the input size), pruned by whole heads.

    The function sizes each head from its input's width (``head_dim = C // num_heads``) and views the
    projection's output with that width again, so, as in ``nn.MultiheadAttention``, inner position ``j`` of
    q, k, v and of the projection's inputs goes with input channel ``j``, a head's positions are one unit,
    and output channel ``j`` is input channel ``j``. A head also owns its column of the relative-position
    table (V1), or its logit scale and its output of the bias MLP (V2)."""
    st, n, x = ctx.state, c.node, c.first
    qkv_layer, proj_layer = m.qkv, m.proj
    table = m._parameters.get("relative_position_bias_table")
    logit_scale = m._parameters.get("logit_scale")
    bias_mlp = m._modules.get("cpb_mlp")
    bias_out = bias_mlp[-1] if isinstance(bias_mlp, nn.Sequential) else None
    heads_from = (
        table.shape[1] if table is not None else logit_scale.shape[0] if logit_scale is not None else 0
    )
    if not (
        isinstance(x, torch.Tensor)
        and x.ndim == 4
        and isinstance(qkv_layer, nn.Linear)
        and isinstance(proj_layer, nn.Linear)
        and heads_from > 0
        and (table is not None or isinstance(bias_out, nn.Linear))
    ):
        return None
    name, tname = str(n.target), type(m).__name__
    qkv, proj = f"{name}.qkv", f"{name}.proj"
    h = _attention_heads(
        ctx, c, (qkv, "Linear"), proj, int(heads_from), qkv_layer.in_features, output_as_input=True
    )
    if h is None:
        return None
    in_slot, rows_slot, proj_in, proj_out = h.in_slot, h.rows_slot, h.proj_in, h.proj_out
    for layer, linear_layer, out_slot, slot_in in (
        (qkv, qkv_layer, rows_slot, in_slot),
        (proj, proj_layer, proj_out, proj_in),
    ):
        st.use_param(f"{layer}.weight", linear_layer.weight, {0: out_slot, 1: slot_in})
        if linear_layer.bias is not None:
            st.use_param(f"{layer}.bias", linear_layer.bias, {0: out_slot})
    head_ids = h.head_ids
    head_slot = st.slot(name, tname, "channel", 0, head_ids)
    macs: list[tuple[int, tuple[int, ...]]] = []
    if table is not None:
        st.use_param(f"{name}.relative_position_bias_table", table, {1: head_slot})
    if logit_scale is not None:
        st.use_param(f"{name}.logit_scale", logit_scale, {0: head_slot})
    if isinstance(bias_mlp, nn.Sequential) and isinstance(bias_out, nn.Linear):
        # V2's bias MLP runs on its table of relative coordinates, its last layer giving one bias per head.
        layer = f"{name}.cpb_mlp.{len(bias_mlp) - 1}"
        bias_slot = st.slot(layer, "Linear", "out", 0, head_ids)
        st.use_param(f"{layer}.weight", bias_out.weight, {0: bias_slot})
        coords = m._buffers["relative_coords_table"]
        positions = math.prod(coords.shape[:-1]) if coords is not None else 0
        hidden = [lay for lay in bias_mlp if isinstance(lay, nn.Linear)]
        macs += [(positions * lay.in_features * lay.out_features, ()) for lay in hidden[:-1]]
        macs.append((positions * bias_out.in_features, (bias_slot,)))
    # The function pads the feature map to whole windows: every linear layer and both attention products
    # run over the padded tokens, each token attending to the window's ``window`` tokens.
    batch, height, width_px = c.args[0].shape[:3]
    wh, ww = (int(v) for v in m.window_size)  # type: ignore[union-attr]
    tokens = batch * (-(-height // wh) * wh) * (-(-width_px // ww) * ww)
    window = wh * ww
    macs += [
        (tokens, (rows_slot, in_slot)),
        (2 * tokens * window, (in_slot,)),
        (tokens, (proj_out, proj_in)),
    ]
    return Mapped(along(h.out_ids, -1, x.ndim), macs)


def flatten(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    if not isinstance(c.first, torch.Tensor):
        return None
    return Mapped(reshape_ids(ctx, Call(c.node, c.value, (c.args[0],), {}, c.id_args, {}), c.first))


def channel_shuffle(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    """Channel shuffle interleaves groups: position i of every group is one unit."""
    assert isinstance(m, nn.ChannelShuffle)
    x, value = c.first, c.value
    if not isinstance(x, torch.Tensor):
        return None
    v = channel_vector(x, 1)
    if v is None:
        ctx.state.poison(x, c.node, "ChannelShuffle on a tensor with channels off axis 1")
        return Mapped(poison_like(value))
    grid = v.expand(value.shape[1]).reshape(m.groups, -1)
    ctx.state.union(grid, grid[:1])
    return Mapped(along(grid.t().reshape(-1), 1, value.ndim))


def softmax(ctx: Context, c: Call, m: nn.Module) -> Mapped | None:
    x = c.first
    if not isinstance(x, torch.Tensor):
        return None
    dim = getattr(m, "dim", 1 if c.value.ndim >= 3 else -1)
    ctx.join_along(x, dim if dim is not None else 1)
    return Mapped(x)


# -- declared channel-wise layers -------------------------------------------------------------------------


def channelwise_leaf(ctx: Context, c: Call, m: nn.Module, spec: LayerSpec) -> Mapped | None:
    """A declared channel-wise black box: one slot for its channels, MACs ``a + b × channels``."""
    st, n, x, value, args = ctx.state, c.node, c.first, c.value, c.args
    if not isinstance(x, torch.Tensor):
        return None
    name, tname = str(n.target), type(m).__name__
    axis = spec.channel_axis
    v = channel_vector(x, axis)
    if v is None or not isinstance(value, torch.Tensor) or value.ndim != args[0].ndim:
        st.poison(x, n, f"{tname} {name!r} (declared channel-wise) reads channels off axis {axis}")
        return Mapped(poison_like(value))
    size = args[0].shape[axis]
    v = v.expand(size)
    slot = st.slot(name, tname, "channel", 0, v)
    for path, t, dim in spec_tensors(m, spec, size):
        st.use_param(f"{name}.{path}", t, {dim: slot})
    terms = None
    if st.record_costs and size > 1:
        a, b = calibrate_channelwise(m, spec, args, ctx.measured_macs, size, axis)
        terms = [(b, (slot,)), (a, ())]
    return Mapped(along(v, axis, value.ndim), terms)


def calibrate_channelwise(
    m: nn.Module, spec: LayerSpec, args: tuple[Any, ...], macs: int, size: int, axis: int
) -> tuple[int, int]:
    """``(a, b)`` with MACs ``a + b × channels`` for a channel-wise declared layer measured at ``macs`` with
    ``size`` channels. Copies shrunk to ``size - 1`` and ``size // 2`` channels must run, keep the other
    output dims and cost exactly that: a declaration that misses a per-channel tensor, or a layer whose
    cost is not linear in its channels, is refused here rather than producing a wrong model."""
    x = args[0]
    measured = {size: macs}
    for width in sorted({size - 1, max(1, size // 2)}):
        shrunk = copy.deepcopy(m)
        shrink_channelwise(shrunk, spec, size, torch.arange(width))
        shape = list(x.shape)
        shape[axis] = width
        small = torch.empty(shape, dtype=x.dtype, device="meta")
        rest = tuple(to_meta(a) for a in args[1:])
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                out = meta_call(shrunk, (small, *rest), {})
        except Exception as exc:
            raise UnsupportedLayerError(
                f"{type(m).__name__} is declared channel-wise but a copy with {width} of its {size} channels "
                f"fails ({type(exc).__name__}: {str(exc)[:160]}); list every per-channel tensor in "
                "LayerSpec.tensors and every channel-count attribute in LayerSpec.sizes"
            ) from exc
        out_shape = list(out.shape) if isinstance(out, torch.Tensor) else None
        if out_shape is None or out_shape[axis] != width:
            raise UnsupportedLayerError(
                f"{type(m).__name__} is declared channel-wise but a copy with {width} channels returns "
                f"{out_shape}; declare it only if output channel c depends on input channel c alone"
            )
        measured[width] = counter.get_total_flops() // 2
    b = measured[size] - measured[size - 1]
    a = measured[size] - b * size
    if any(a + b * w != cost for w, cost in measured.items()):
        raise UnsupportedLayerError(
            f"{type(m).__name__} is declared channel-wise but its MACs are not linear in its channels "
            f"({measured}); trace it instead (no LayerSpec) or freeze it with leaf_modules=[...]"
        )
    return a, b
