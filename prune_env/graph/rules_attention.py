"""Rules for the ops attention is made of: matrix products, fused attention, unbinding and gathers.

A matrix product ``a @ b`` contracts ``a``'s last axis with ``b``'s second-to-last: removing a contracted
position removes it from both operands, so their elements there are one. Its output keeps ``a``'s rows and
``b``'s columns, and every output fibre exists for as long as *any* of the positions it sums over does —
so where an operand's channels name output fibres (the heads of ``q @ k.transpose(-2, -1)``), the positions
each fibre sums over go together: attention is pruned by whole heads, q, k, v and the output projection's
inputs of a head at once. The product's MACs depend on the kept positions, so they are counted on an
operation slot (kind ``"op"``): exact after pruning, with nothing to slice.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prune_env.graph.context import Call, Context, Macs, Mapped
from prune_env.graph.elements import POISON, compress, poison_like, varying_axes


def _aligned(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    return ids.reshape([1] * (ndim - ids.ndim) + list(ids.shape))


def _fibre_ids(ctx: Context, ids: torch.Tensor, contracted: int) -> torch.Tensor | None:
    """The ids an operand gives the product's output: none when it is poison throughout or its channels
    vary only along the contracted axis (a weight-like operand whose rows are summed away); else its ids
    with the contracted positions of every fibre made one unit."""
    varying = varying_axes(ids)
    if not varying and bool((ids == POISON).all()):
        return None
    if varying == [contracted % ids.ndim]:
        return None
    return ctx.join_along(ids, contracted)


def contract(
    ctx: Context, c: Call, a: Any, b: Any, out_shape: torch.Size, depth: int, slot: str
) -> tuple[torch.Tensor, Macs]:
    """Ids of ``a @ b`` (operand ids ``a``, ``b``; ``depth`` contracted positions) and its modelled MACs,
    counted on the operation slot named ``slot``."""
    st = ctx.state
    total = math.prod(out_shape) * depth
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or len(out_shape) < 2:
        st.poison((a, b), c.node, f"{ctx.describe(c.node)} on operands without channel ids or of one axis")
        return torch.zeros([1] * len(out_shape), dtype=torch.int64), [(total, ())]
    nd = len(out_shape)
    a, b = _aligned(a, nd), _aligned(b, nd)
    # Positions multiplied together: (…, M, K, 1) against (…, 1, K, N).
    pa, pb = a.unsqueeze(-1), b.unsqueeze(-3)
    st.union(pa, pb)
    products = torch.broadcast_tensors(pa, pb)[0]
    fa, fb = _fibre_ids(ctx, a, -1), _fibre_ids(ctx, b, -2)
    if fa is not None and fb is not None:
        st.union(fa, fb)
        out = torch.broadcast_tensors(fa, fb)[0]
    else:
        out = fa if fa is not None else fb if fb is not None else torch.zeros([1] * nd, dtype=torch.int64)
    # MACs = total × (kept products / all products): every product's elements go together (united above).
    products = compress(products)
    if products.numel() == 1:
        return compress(out), [(total, ())]
    index = st.slot(slot, "matmul", "op", -1, products)
    return compress(out), [(total // products.numel(), (index,))]


def matmul(ctx: Context, c: Call) -> Mapped:
    """``a @ b``, ``torch.matmul``, ``torch.bmm`` with both operands of at least two axes."""
    va, vb = c.args[0], c.args[1]
    value = c.value
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.ndim >= 2 and vb.ndim >= 2):
        depth = va.shape[-1] if isinstance(va, torch.Tensor) and va.ndim else 1
        ctx.state.poison(c.id_args, c.node, f"{ctx.describe(c.node)} of a vector")
        return Mapped(poison_like(value), [(value.numel() * depth, ())])
    ids, macs = contract(ctx, c, c.id_args[0], c.id_args[1], value.shape, va.shape[-1], c.node.name)
    return Mapped(ids, macs)


def scaled_dot_product_attention(ctx: Context, c: Call) -> Mapped:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=…)``: ``softmax(q @ kᵀ + mask) @ v``."""
    q, k, v = (
        c.args[i] if len(c.args) > i else c.kwargs[name] for i, name in enumerate(("query", "key", "value"))
    )
    iq, ik, iv = (
        c.id_args[i] if len(c.id_args) > i else c.id_kwargs[name]
        for i, name in enumerate(("query", "key", "value"))
    )
    value = c.value
    scores_shape = torch.Size([*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2]])
    ik_t = ik.transpose(-2, -1) if isinstance(ik, torch.Tensor) and ik.ndim >= 2 else ik
    scores, macs_qk = contract(ctx, c, iq, ik_t, scores_shape, q.shape[-1], f"{c.node.name}.scores")
    mask = c.kwargs.get("attn_mask", c.args[3] if len(c.args) > 3 else None)
    mask_ids = c.id_kwargs.get("attn_mask", c.id_args[3] if len(c.id_args) > 3 else None)
    if isinstance(mask, torch.Tensor) and isinstance(mask_ids, torch.Tensor):
        nd = len(scores_shape)
        # A mask broadcast along an axis where the scores' channels vary is shared by them (one mask for
        # every head); otherwise it is added position by position, pairing its channels with the scores'.
        mask_shape = (1,) * (nd - mask.ndim) + tuple(mask.shape)
        if not any(mask_shape[ax] == 1 for ax in varying_axes(scores)):
            ctx.state.union(scores, _aligned(mask_ids, nd))
    scores = ctx.join_along(scores, -1)
    ids, macs_av = contract(ctx, c, scores, iv, value.shape, v.shape[-2], f"{c.node.name}.values")
    return Mapped(ids, [*(macs_qk or []), *(macs_av or [])])


def unbind(ctx: Context, c: Call) -> Mapped:
    """``x.unbind(dim)``: the code names every part (``q, k, v = …``), so the axis keeps all its positions —
    they are one unit."""
    x, value = c.first, c.value
    dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else 0)
    if not isinstance(x, torch.Tensor):
        return Mapped(poison_like(value))
    first = ctx.join_along(x, dim).squeeze(dim % x.ndim)
    return Mapped(tuple(first for _ in value))


def roll(ctx: Context, c: Call) -> Mapped | None:
    """``torch.roll`` along axes the channels do not vary on (a cyclic shift of windows)."""
    x = c.first
    dims = c.kwargs.get("dims", c.args[2] if len(c.args) > 2 else None)
    if not isinstance(x, torch.Tensor) or dims is None:
        return None
    axes = {d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    return None if axes & set(varying_axes(x)) else Mapped(x)


def gather_rows(ctx: Context, c: Call, x: torch.Tensor) -> Mapped | None:
    """``table[index]`` with an integer index tensor: rows picked by values the meta pass does not see, so
    each column's rows are one unit and the result keeps the columns' channels (a relative-position bias
    table of one column per head)."""
    tensor, index = c.args[0], c.args[1]
    if not isinstance(index, torch.Tensor) or index.dtype in (torch.bool, torch.uint8) or tensor.ndim < 1:
        return None
    rows = ctx.join_along(_aligned(x, tensor.ndim), 0)
    return Mapped(compress(rows.reshape([1] * index.ndim + list(rows.shape[1:]))))
