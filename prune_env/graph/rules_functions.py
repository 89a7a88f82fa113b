"""Rules for functions and tensor methods: how each maps its operands' channel ids to its output's.

Elementwise ops pair up (union) the elements they combine; data-movement ops (view, permute, cat, chunk,
indexing, ...) run on the id tensors themselves, so their index mapping is exact rather than hand-written.
Each rule returns the output ids (:class:`Mapped`), or None when it cannot map the op; the op table in
``ops`` says which rule handles which function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from prune_env.graph.context import Call, Context, Mapped
from prune_env.graph.elements import along, channel_vector, compress, poison_like, varying_axes
from prune_env.graph.rules_attention import gather_rows

RESHAPES = {"view", "reshape", torch.reshape}


def full(ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Ids expanded to the value's whole shape (data movement then moves them exactly like the value)."""
    return ids.expand(*shape).contiguous()


# -- sizes and containers -------------------------------------------------------------------------------


def size(ctx: Context, c: Call) -> Mapped:
    """``x.size()``, ``x.shape``, ``x.dim()`` and arithmetic on them: integers, which remember the channels
    they count (see :meth:`Context.record_size`)."""
    ctx.record_size(c.node, c.args, c.first)
    return Mapped(None)


def getitem(ctx: Context, c: Call) -> Mapped | None:
    """``value[index]``: of a tensor (indexing), a tuple of values (unpacking) or of a size."""
    first = c.first
    if isinstance(first, torch.Tensor):
        return _index_tensor(ctx, c, first)
    if isinstance(first, (tuple, list)):
        return Mapped(first[c.args[1]])
    return size(ctx, c)


def no_channels(ctx: Context, c: Call) -> Mapped:
    """A value computed from sizes and channel-free inputs (a causal mask): it carries no channels."""
    return Mapped(poison_like(c.value))


def pack(ctx: Context, c: Call) -> Mapped:
    """A namedtuple built by traced code: the ids of its fields."""
    return Mapped(tuple(c.id_args) + tuple(c.id_kwargs.values()))


# -- elementwise ----------------------------------------------------------------------------------------


def unary(ctx: Context, c: Call) -> Mapped | None:
    """Activations, casts, copies: output channel i is input channel i."""
    return Mapped(c.first) if isinstance(c.first, torch.Tensor) else None


def binary(ctx: Context, c: Call) -> Mapped:
    """``a op b``: positions paired by broadcasting are one element, unless one side is shared."""
    st = ctx.state
    value = c.value
    operands = [
        (ids, a.shape)
        for ids, a in zip(c.id_args, c.args, strict=False)
        if isinstance(a, torch.Tensor) and isinstance(ids, torch.Tensor)
    ]
    if not isinstance(value, torch.Tensor):
        return Mapped(None)
    if not operands:
        return Mapped(poison_like(value))
    nd = value.ndim
    aligned = [(ids.reshape([1] * (nd - ids.ndim) + list(ids.shape)), (1,) * (nd - len(s)) + tuple(s))
               for ids, s in operands]  # fmt: skip
    if len(aligned) == 1:
        return Mapped(aligned[0][0])
    (ia, sa), (ib, sb) = aligned[:2]
    # An operand broadcast (extent 1) along an axis where the other's channels vary is a shared value
    # (a scalar gain, a stochastic-depth row mask): it does not couple the other's channels. Anything
    # else is paired position by position — including fully poisoned operands, whose ids are
    # compressed to size 1 but whose values are not broadcast.
    b_shared = any(sb[ax] == 1 for ax in varying_axes(ia))
    a_shared = any(sa[ax] == 1 for ax in varying_axes(ib))
    if b_shared and a_shared:
        st.poison((ia, ib), c.node, f"{ctx.describe(c.node)} broadcasts channels against each other")
        return Mapped(poison_like(value))
    if b_shared:
        return Mapped(ia)
    if a_shared:
        return Mapped(ib)
    st.union(ia, ib)
    # The pairing made both sides one element per position, so either side's ids name the result; the
    # broadcast copy is compressed again (a token-wise position embedding added to a channel vector leaves
    # channels that vary along the channel axis only).
    return Mapped(compress(torch.broadcast_tensors(ia, ib)[0]))


def spatial_ids(ctx: Context, n: torch.fx.Node, value: Any, x: Any) -> Any:
    """Pooling, interpolation, padding: channels stay on axis 1, one output channel per input one."""
    if not isinstance(x, torch.Tensor):
        return poison_like(value)
    v = channel_vector(x, 1)
    if v is None:
        ctx.state.poison(x, n, f"{ctx.describe(n)} on a tensor with channels off axis 1")
        return poison_like(value)
    return along(v, 1, value.ndim) if value.ndim > 1 else poison_like(value)


def spatial(ctx: Context, c: Call) -> Mapped:
    return Mapped(spatial_ids(ctx, c.node, c.value, c.first))


def softmax(ctx: Context, c: Call) -> Mapped:
    """Softmax along an axis: exact when whole fibres along it go (see :meth:`Context.join_along`)."""
    first = c.first
    dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else None)
    if isinstance(first, torch.Tensor) and dim is not None:
        ctx.join_along(first, dim)
    return Mapped(first if isinstance(first, torch.Tensor) else poison_like(c.value))


def _functional_norm(ctx: Context, c: Call, axis: int) -> Mapped:
    st, n = ctx.state, c.node
    x = c.first
    v = channel_vector(x, axis) if isinstance(x, torch.Tensor) else None
    params = [*c.id_args[1:], *c.id_kwargs.values()]
    if v is None:
        st.poison((x, params), n, f"{ctx.describe(n)} over several axes")
        return Mapped(x)
    if axis == -1 and len(c.args[1] if len(c.args) > 1 else c.kwargs["normalized_shape"]) != 1:
        st.poison((x, params), n, f"{ctx.describe(n)} over several axes")
        return Mapped(x)
    for p in params:
        if isinstance(p, torch.Tensor) and p.numel() == v.numel():
            st.union(p.reshape(-1), v)
    return Mapped(x)


def layer_norm(ctx: Context, c: Call) -> Mapped:
    """``F.layer_norm`` over the last axis: its weight and bias follow that axis's channels."""
    return _functional_norm(ctx, c, axis=-1)


def batch_norm(ctx: Context, c: Call) -> Mapped:
    """``F.batch_norm``: its statistics, weight and bias follow axis 1's channels."""
    return _functional_norm(ctx, c, axis=1)


def pad(ctx: Context, c: Call) -> Mapped | None:
    """Padding of axes along which the channels do not vary (spatial padding)."""
    return padded(c.first, c.args[1] if len(c.args) > 1 else c.kwargs["pad"])


def padded(first: Any, widths: Sequence[int]) -> Mapped | None:
    """``first`` padded by ``widths`` (last axis first, as ``F.pad`` takes them): its ids unchanged if no
    padded axis carries channels, else None (not mapped)."""
    touched = {first.ndim - 1 - i // 2 for i, p in enumerate(widths) if p} if first is not None else set()
    if isinstance(first, torch.Tensor) and touched & set(varying_axes(first)):
        return None
    return Mapped(first)


def reduce(ctx: Context, c: Call) -> Mapped:
    """``mean``/``sum``/``amax``/``amin`` over explicit axes: each reduced fibre is one unit."""
    st, n, x, value = ctx.state, c.node, c.first, c.value
    if not isinstance(x, torch.Tensor) or not isinstance(value, torch.Tensor):
        return Mapped(poison_like(value))
    dims = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else None)
    if dims is None:
        st.poison(x, n, f"{ctx.describe(n)} over all axes")
        return Mapped(poison_like(value))
    axes = {d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    for d in axes:
        x = ctx.join_along(x, d)
    keepdim = c.kwargs.get("keepdim", c.args[2] if len(c.args) > 2 else False)
    if keepdim:
        return Mapped(x)
    return Mapped(x.reshape([s for a, s in enumerate(x.shape) if a not in axes]))


# -- data movement --------------------------------------------------------------------------------------


def reshape_ids(ctx: Context, c: Call, x: Any) -> Any:
    """View, reshape, permute, flatten, ...: the same op applied to the ids. A reshape that splits the
    channel axis must size it from channel counts (-1 or a size read from a tensor), never a literal."""
    st, n, value, args = ctx.state, c.node, c.value, c.args
    if not isinstance(x, torch.Tensor):
        return poison_like(value)
    fn = n.target
    spec = ctx.resize_spec(n)
    split = spec.split_axis if spec is not None else None
    if fn == "expand" and split is not None:
        grown = _expanded_literal_axis(n, args[0], value)
        if grown is not None:
            # A tensor (a mask) expanded to a literal size the module recomputes (its head count): the new
            # axis follows whatever channels it is paired with (fresh elements that only unions place);
            # the tensor itself is taken whole, shared by every position of that axis.
            st.poison(x)
            return along(st.fresh(value.shape[grown], producer=False), grown, value.ndim)
    ids = full(x, args[0].shape)
    if n.op == "call_module":
        out = ctx.submodule(fn)(ids)
    elif isinstance(fn, str):
        out = getattr(ids, fn)(*args[1:], **c.kwargs)
    else:
        out = fn(ids, *args[1:], **c.kwargs)
    out = compress(out)
    if fn in RESHAPES or fn == "unflatten":
        varying = varying_axes(out)
        shape_args = _shape_args(n)
        if shape_args is not None and not ctx.couple_sizes(n, shape_args, x, args[0].shape):
            return poison_like(value)
        if varying and shape_args is not None:
            dynamic = [ax for ax in varying if ax < len(shape_args) and ctx.adapts(shape_args[ax])]
            # Declared: every literal size here is recomputed; a split shrinks the declared axis.
            if split is not None and len(varying) == 1:
                dynamic = varying
            elif split is not None and -len(varying) <= split < len(varying):
                dynamic = [varying[split]]
            if len(dynamic) != 1:
                st.poison(x, n, f"{ctx.describe(n)} with a literal channel size")
                return poison_like(value)
            # The channel axis was split: only the dynamic axis may shrink, so the others'
            # positions are pruned together (channel shuffle keeps its interleaving).
            keep_ax = dynamic[0]
            for ax in varying:
                if ax != keep_ax:
                    st.union(out, out.narrow(ax, 0, 1))
    return out


def reshape(ctx: Context, c: Call) -> Mapped:
    return Mapped(reshape_ids(ctx, c, c.first))


def _expanded_literal_axis(n: torch.fx.Node, tensor: Any, value: Any) -> int | None:
    """The one axis ``tensor.expand(...)`` grows from 1 to a literal size, if exactly one."""
    if not (isinstance(tensor, torch.Tensor) and isinstance(value, torch.Tensor)):
        return None
    before = (1,) * (value.ndim - tensor.ndim) + tuple(tensor.shape)
    grown = [
        ax
        for ax, arg in enumerate(_shape_args(n) or [])
        if isinstance(arg, int) and arg != -1 and ax < value.ndim and before[ax] == 1 and value.shape[ax] > 1
    ]
    return grown[0] if len(grown) == 1 else None


def _shape_args(n: torch.fx.Node) -> Sequence[Any] | None:
    if n.op == "call_module":
        return None
    if n.target == "unflatten":
        return None  # sizes of one axis only; unflatten of a channel axis is rare — be safe below
    rest = list(n.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    if "shape" in n.kwargs:
        rest = list(n.kwargs["shape"])  # type: ignore[arg-type]
    return rest


def cat(ctx: Context, c: Call) -> Mapped:
    """Concatenation along the channel axis keeps each part's channels; along another axis it pairs them."""
    st, n, value, args = ctx.state, c.node, c.value, c.args
    tensors = args[0]
    dim = c.kwargs.get("dim", args[1] if len(args) > 1 else 0)
    ids = list(c.id_args[0])
    if any(not isinstance(i, torch.Tensor) for i in ids):
        st.poison(ids, n, "cat of tensors without channel ids")
        return Mapped(poison_like(value))
    if all(i.shape[dim] == 1 for i in ids):
        # Concatenation along a non-channel axis (tokens, batch): channels are paired elementwise.
        for i in ids[1:]:
            st.union(ids[0], i)
        return Mapped(ids[0])
    # Each part expanded along the concatenated axis and the axes where some part's ids vary: the same
    # result as expanding every part to its whole shape, without materialising the constant axes.
    nd = tensors[0].ndim
    ids = [i.reshape([1] * (nd - i.ndim) + list(i.shape)) for i in ids]
    spread = {a for i in ids for a in varying_axes(i)} | {dim % nd}
    parts = [
        i.expand([s if a in spread else 1 for a, s in enumerate(t.shape)])
        for i, t in zip(ids, tensors, strict=True)
    ]
    return Mapped(compress(torch.cat(parts, dim=dim)))


def stack(ctx: Context, c: Call) -> Mapped:
    ids = [i for i in c.id_args[0] if isinstance(i, torch.Tensor)]
    if len(ids) != len(c.id_args[0]):
        ctx.state.poison(ids, c.node, "stack of tensors without channel ids")
        return Mapped(poison_like(c.value))
    for i in ids[1:]:
        ctx.state.union(ids[0], i)
    dim = c.args[1] if len(c.args) > 1 else 0
    return Mapped(ids[0].unsqueeze(dim))


def chunk(ctx: Context, c: Call) -> Mapped:
    """``chunk``/``split``: every part must keep the same channels count unless surgery resizes them."""
    st, n, value, args, x = ctx.state, c.node, c.value, c.args, c.first
    if not isinstance(x, torch.Tensor):
        return Mapped(poison_like(value))
    tensor = args[0]
    dim = c.kwargs.get("dim", args[2] if len(args) > 2 else 0) % tensor.ndim
    parts = list(torch.split(full(x, tensor.shape), [p.shape[dim] for p in value], dim=dim))
    if dim in varying_axes(x):
        size_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size_or_sections")
        if isinstance(size_arg, torch.fx.Node) and not ctx.couple_sizes(n, [size_arg], x, tensor.shape):
            return Mapped(poison_like(value))
        adaptive = n.target in ("chunk", torch.chunk) or isinstance(size_arg, torch.fx.Node)
        if ctx.resized(n):
            if isinstance(size_arg, (list, tuple)):
                # Sizes recomputed per part after surgery: each part keeps what its consumers keep.
                return Mapped(tuple(compress(p) for p in parts))
            adaptive = True  # one size recomputed for every part: the parts stay equal below
        equal = len({p.shape[dim] for p in parts}) == 1
        if not (adaptive and equal):
            st.poison(x, n, f"{ctx.describe(n)} with literal sizes on a channel axis")
            return Mapped(poison_like(value))
        # Every part must keep the same number of channels: prune corresponding positions together.
        for p in parts[1:]:
            st.union(parts[0], p)
    return Mapped(tuple(compress(p) for p in parts))


def tiled_channels(ctx: Context, c: Call) -> Mapped | None:
    """A function that rearranges space into the last axis (Swin's patch merging: the four pixels of every
    2 x 2 patch side by side): output feature ``k·C + j`` is input channel ``j`` for every ``k``, whatever
    moved between spatial positions (zero padding there carries no channels)."""
    x, value = c.first, c.value
    if not isinstance(x, torch.Tensor) or not isinstance(value, torch.Tensor) or x.ndim != value.ndim:
        return None
    vin = channel_vector(x, -1)
    width = c.args[0].shape[-1]
    if vin is None or width == 0 or value.shape[-1] % width:
        return None
    return Mapped(along(vin.expand(width).repeat(value.shape[-1] // width), -1, value.ndim))


def _index_tensor(ctx: Context, c: Call, x: torch.Tensor) -> Mapped:
    """Basic indexing of a tensor: slices of a channel axis must keep it whole (or be resized)."""
    st, n, value = ctx.state, c.node, c.value
    tensor, index = c.args[0], c.args[1]
    index_t = index if isinstance(index, tuple) else (index,)
    if isinstance(index, torch.Tensor):
        gathered = gather_rows(ctx, c, x)
        if gathered is not None:
            return gathered
    if any(isinstance(i, torch.Tensor) or i is None for i in index_t):
        st.poison(x, n, f"{ctx.describe(n)} with advanced indexing")
        return Mapped(poison_like(value))
    # Which input axes does the index restrict?
    axes: list[int] = []
    pos = 0
    for k, i in enumerate(index_t):
        if i is Ellipsis:
            pos = tensor.ndim - (len(index_t) - k - 1)
            continue
        if not (isinstance(i, slice) and i == slice(None)):
            axes.append(pos)
        pos += 1
    restricted = set(axes) & set(varying_axes(x))
    if restricted and not (ctx.resized(n) and _covers(index_t, tensor.shape, restricted)):
        st.poison(x, n, f"{ctx.describe(n)} slices a channel axis with literal bounds")
        return Mapped(poison_like(value))
    return Mapped(compress(full(x, tensor.shape)[index]))


def _covers(index: tuple[Any, ...], shape: Sequence[int], axes: set[int]) -> bool:
    """Whether a basic index leaves every axis in ``axes`` whole (``x[:, :n]`` with ``n`` its extent)."""
    pos = 0
    for k, i in enumerate(index):
        if i is Ellipsis:
            pos = len(shape) - (len(index) - k - 1)
            continue
        if pos in axes:
            if not isinstance(i, slice) or i.step not in (None, 1):
                return False
            start, stop, _ = i.indices(shape[pos])
            if start != 0 or stop != shape[pos]:
                return False
        pos += 1
    return True
