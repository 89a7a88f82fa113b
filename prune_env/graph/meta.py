"""Shapes without data: meta stand-ins for values, and output shapes computed without running an op.

Propagation needs every value's shape, never its numbers, so it runs the traced graph on ``meta`` tensors.
Running an op on meta tensors is cheap for ops with native meta kernels (convolutions, views), but many
elementwise ops, reductions and norms only have Python reference implementations on meta, which cost
0.2–1.5 ms a call — more than the real op on a small input. The shape rules below give those ops' outputs
directly; an op without one (or with operands they do not cover) simply runs on the meta tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# An output computed by a shape rule, or NOT_COVERED when the rule does not apply to these operands.
NOT_COVERED: Any = object()
MetaShape = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def to_meta(value: Any) -> Any:
    """A data-less stand-in with the same shape and dtype (cheap: nothing is copied)."""
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(to_meta(v) for v in value)
    return value


def meta_call(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``m`` on meta stand-ins of its tensors (shapes only)."""
    state = {k: to_meta(t) for k, t in (*m.named_parameters(), *m.named_buffers())}
    return torch.func.functional_call(m, state, args, kwargs)


def _empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device="meta")


def same_as_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Elementwise on one tensor, normalisation: the output has the input's shape and dtype. The input
    stand-in itself is returned (a meta tensor has no data that an in-place op could change)."""
    x = args[0] if args else kwargs.get("input")
    return x if isinstance(x, torch.Tensor) else NOT_COVERED


def _broadcast(shapes: Sequence[Sequence[int]]) -> tuple[int, ...] | None:
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for k, size in enumerate(shape, start=ndim - len(shape)):
            if size != 1:
                if out[k] not in (1, size):
                    return None  # not broadcastable: let the op raise its own error
                out[k] = size
    return tuple(out)


def _floating_operands(operands: Sequence[Any]) -> torch.Tensor | None:
    """The first tensor among ``operands`` when every tensor operand is floating point of one dtype (so
    the result has that dtype whatever the Python scalars), else None."""
    tensors = [a for a in operands if isinstance(a, torch.Tensor)]
    if not tensors or any(not t.is_floating_point() or t.dtype != tensors[0].dtype for t in tensors):
        return None
    if any(not isinstance(a, (torch.Tensor, float, int)) or isinstance(a, bool) for a in operands):
        return None
    return tensors[0]


def broadcast_binary(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``a op b`` (add, mul, maximum, ...): the broadcast shape of the operands."""
    if len(args) != 2:
        return NOT_COVERED
    like = _floating_operands(args)
    if like is None:
        return NOT_COVERED
    shape = _broadcast([a.shape for a in args if isinstance(a, torch.Tensor)])
    return NOT_COVERED if shape is None else _empty(shape, like)


def broadcast_where(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.where(condition, a, b)``: the broadcast shape of all three, the dtype of ``a`` and ``b``."""
    if len(args) != 3 or kwargs or not isinstance(args[0], torch.Tensor):
        return NOT_COVERED
    like = _floating_operands(args[1:])
    if like is None:
        return NOT_COVERED
    shape = _broadcast([a.shape for a in args if isinstance(a, torch.Tensor)])
    return NOT_COVERED if shape is None else _empty(shape, like)


def reduced(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.mean(dims, keepdim)`` and the like over explicit dims of a floating-point tensor."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or set(kwargs) - {"dim", "keepdim"}:
        return NOT_COVERED
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if len(args) > 3 or not isinstance(keepdim, bool):
        return NOT_COVERED
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return NOT_COVERED
    if any(not -x.ndim <= d < x.ndim for d in dims):
        return NOT_COVERED
    axes = {d % x.ndim for d in dims}
    shape = [1 if a in axes else s for a, s in enumerate(x.shape) if keepdim or a not in axes]
    return _empty(shape, x)


def adaptive_pool(spatial_dims: int) -> MetaShape:
    """``adaptive_{avg,max}_pool{spatial_dims}d(x, output_size)``: leading axes, then the requested sizes."""

    def shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else None
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        if not isinstance(x, torch.Tensor) or len(args) > 2 or set(kwargs) - {"output_size"}:
            return NOT_COVERED
        return _adaptive_shape(x, size, spatial_dims)

    return shape


def adaptive_pool_module(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if getattr(m, "return_indices", False):
        return NOT_COVERED
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or kwargs or len(args) != 1:
        return NOT_COVERED
    spatial_dims = {"1d": 1, "2d": 2, "3d": 3}.get(type(m).__name__[-2:])
    return NOT_COVERED if spatial_dims is None else _adaptive_shape(x, m.output_size, spatial_dims)


def _adaptive_shape(x: torch.Tensor, size: Any, spatial_dims: int) -> Any:
    sizes = [size] * spatial_dims if isinstance(size, int) else size
    if not isinstance(sizes, (tuple, list)) or len(sizes) != spatial_dims or x.ndim < spatial_dims + 1:
        return NOT_COVERED
    spatial = x.shape[x.ndim - spatial_dims :]
    out = [s if want is None else want for want, s in zip(sizes, spatial, strict=True)]
    if not all(isinstance(s, int) and s > 0 for s in out):
        return NOT_COVERED
    return _empty([*x.shape[: x.ndim - spatial_dims], *out], x)


def module_same_as_input(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A module whose output has its input's shape and dtype (activations, dropout, norms)."""
    return same_as_input(args, kwargs) if len(args) == 1 and not kwargs else NOT_COVERED


def _per_axis(value: Any, n: int) -> tuple[int, ...] | None:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    return values if len(values) == n and all(isinstance(v, int) for v in values) else None


def convolution_module(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``nn.Conv{1,2,3}d`` on a batched input with its channels: the standard output-size formula (the meta
    kernel computes it in Python, slower than the formula itself)."""
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    x = args[0] if len(args) == 1 and not kwargs else None
    n = len(m.kernel_size)
    if not isinstance(x, torch.Tensor) or x.ndim != n + 2 or x.shape[1] != m.in_channels:
        return NOT_COVERED
    if x.dtype != m.weight.dtype or m.padding_mode != "zeros":
        return NOT_COVERED  # other padding modes may refuse padding wider than the input
    spatial = tuple(x.shape[2:])
    if m.padding == "same":
        out = spatial
    else:
        padding = (0,) * n if m.padding == "valid" else _per_axis(m.padding, n)
        if padding is None:
            return NOT_COVERED
        out = tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(spatial, padding, m.dilation, m.kernel_size, m.stride, strict=True)
        )
    if any(size <= 0 for size in out):
        return NOT_COVERED
    return _empty((x.shape[0], m.out_channels, *out), x)


_POOLS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
}  # fmt: skip


def pool_module(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Max and average pooling layers: PyTorch's pooling output-size formula, ceil mode included."""
    n = _POOLS.get(type(m))
    x = args[0] if len(args) == 1 and not kwargs else None
    if n is None or not isinstance(x, torch.Tensor) or x.ndim not in (n + 1, n + 2):
        return NOT_COVERED
    if getattr(m, "return_indices", False):
        return NOT_COVERED
    kernel = _per_axis(m.kernel_size, n)
    stride = _per_axis(m.stride if m.stride is not None else m.kernel_size, n)
    padding = _per_axis(m.padding, n)
    dilation = _per_axis(getattr(m, "dilation", 1), n)
    if kernel is None or stride is None or padding is None or dilation is None:
        return NOT_COVERED
    ceil = bool(m.ceil_mode)
    out = []
    for size, k, s, p, d in zip(x.shape[x.ndim - n :], kernel, stride, padding, dilation, strict=True):
        if s <= 0 or 2 * p > k or size < d * (k - 1) + 1:
            return NOT_COVERED  # invalid for PyTorch, or close to it: let the op decide
        o = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
        if ceil and (o - 1) * s >= size + p:
            o -= 1  # the last window must start inside the input or its left padding
        if o <= 0:
            return NOT_COVERED
        out.append(o)
    return _empty([*x.shape[: x.ndim - n], *out], x)


def concatenated(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.cat(tensors, dim)`` of floating-point tensors of one dtype and matching other extents."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not isinstance(tensors, (tuple, list)) or not tensors or not isinstance(dim, int):
        return NOT_COVERED
    if len(args) > 2 or set(kwargs) - {"tensors", "dim"}:
        return NOT_COVERED
    like = tensors[0]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not like.is_floating_point():
        return NOT_COVERED
    if not -like.ndim <= dim < like.ndim:
        return NOT_COVERED
    dim %= like.ndim
    rest = [s for a, s in enumerate(like.shape) if a != dim]
    for t in tensors:
        if (
            t.dtype != like.dtype
            or t.ndim != like.ndim
            or [s for a, s in enumerate(t.shape) if a != dim] != rest
        ):
            return NOT_COVERED
    shape = list(like.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return _empty(shape, like)
