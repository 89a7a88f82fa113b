"""timm's MobileViT blocks, written so the engine can trace them.

A MobileViT block cuts its feature map into patches, runs a transformer over the patches and folds them
back. timm's forward computes the patch grid with Python arithmetic on the input's size (``math.ceil``,
``if new_h != H``), which torch.fx cannot trace, so the block used to be a black box whose channels all
stayed. The forward below is the same computation with the two size-dependent steps as single functions
(:func:`to_patches`, :func:`from_patches`, kept whole by torch.fx): each moves the channels between the
feature map's axis 1 and the tokens' last axis, which the engine maps exactly. Only tracing uses it; the
pruned model runs timm's own forward, which reads its channel counts from the tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from prune_env.graph.context import Call, Context, Mapped
from prune_env.graph.elements import along, channel_vector


def _grid(height: int, width: int, patch_h: int, patch_w: int) -> tuple[int, int]:
    """Patches along each side once the map is resized to whole patches."""
    return math.ceil(height / patch_h), math.ceil(width / patch_w)


def to_patches(x: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B·P, N, C]`` tokens (P pixels per patch, N patches), bilinearly resized to
    whole patches first when the map is not made of them (as timm's MobileViT block does)."""
    b, c, h, w = x.shape
    rows, cols = _grid(h, w, patch_h, patch_w)
    if (rows * patch_h, cols * patch_w) != (h, w):
        x = F.interpolate(x, size=(rows * patch_h, cols * patch_w), mode="bilinear", align_corners=False)
    x = x.reshape(b, c, rows, patch_h, cols, patch_w).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(b * patch_h * patch_w, rows * cols, c)


def from_patches(tokens: torch.Tensor, like: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """The inverse of :func:`to_patches`: ``[B·P, N, C]`` tokens back to ``like``'s ``[B, C, H, W]``."""
    b, _, h, w = like.shape
    c = tokens.shape[-1]
    rows, cols = _grid(h, w, patch_h, patch_w)
    x = tokens.reshape(b, patch_h, patch_w, rows, cols, c).permute(0, 5, 3, 1, 4, 2)
    x = x.reshape(b, c, rows * patch_h, cols * patch_w)
    if (rows * patch_h, cols * patch_w) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x


torch.fx.wrap("to_patches")
torch.fx.wrap("from_patches")


def trace_mobilevit_block(block: Any, x: torch.Tensor) -> Any:
    """timm's ``MobileVitBlock.forward`` for tracing (same layers, same order, same values); ``block`` is
    the ``MobileVitBlock``."""
    shortcut = x
    x = block.conv_1x1(block.conv_kxk(x))
    patch_h, patch_w = block.patch_size
    tokens = block.norm(block.transformer(to_patches(x, patch_h, patch_w)))
    x = block.conv_proj(from_patches(tokens, x, patch_h, patch_w))
    if block.conv_fusion is not None:
        x = block.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


def patches_rule(ctx: Context, c: Call) -> Mapped | None:
    """:func:`to_patches`: feature-map channel ``j`` is token feature ``j``."""
    channels = channel_vector(c.first, 1) if isinstance(c.first, torch.Tensor) else None
    return None if channels is None else Mapped(along(channels, -1, c.value.ndim))


def unpatches_rule(ctx: Context, c: Call) -> Mapped | None:
    """:func:`from_patches`: token feature ``j`` is channel ``j`` of the map, which has as many channels
    as ``like`` (the real forward reads that count from it)."""
    tokens, like = c.id_args[0], c.id_args[1]
    channels = channel_vector(tokens, -1) if isinstance(tokens, torch.Tensor) else None
    if channels is None:
        return None
    if isinstance(like, torch.Tensor):
        like_channels = channel_vector(like, 1)
        if like_channels is None:
            return None
        ctx.state.union(channels.expand(c.value.shape[1]), like_channels.expand(c.value.shape[1]))
    return Mapped(along(channels, 1, c.value.ndim))
