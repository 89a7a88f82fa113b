"""Attention written in plain torch: matmuls and fused attention map to whole heads with exact MACs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_checks import flop_counter_macs

import prune_env
from prune_env.surgery import zero_units


class SelfAttention(nn.Module):
    """Multi-head self-attention whose forward uses its head count as a literal size."""

    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.zeros(1, 1, 1, 1))  # a buffer added to every head's scores
        self.mask = torch.zeros(5, 5)  # a plain tensor attribute (neither parameter nor buffer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.mask + self.bias  # (n, n) with n = 5 here
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5 + mask).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class DeclaredAttention(SelfAttention):
    """The same code, declared: surgery recomputes its head count."""


def resize_heads(pruned: nn.Module, original: nn.Module) -> None:
    assert isinstance(pruned, SelfAttention) and isinstance(original, SelfAttention)
    pruned.num_heads = pruned.proj.in_features // original.head_dim


prune_env.register_layer(DeclaredAttention, prune_env.LayerSpec(resize=resize_heads, split_axis=-2))


class Encoder(nn.Module):
    def __init__(self, fused: bool, declared: bool = True, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = (DeclaredAttention if declared else SelfAttention)(dim, heads, fused)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(dim=1))


@pytest.mark.parametrize("fused", [True, False])
def test_declared_attention_prunes_whole_heads_exactly(fused: bool) -> None:
    torch.manual_seed(0)
    model = Encoder(fused).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    graph = prune_env.build_graph(model, x[:1])
    heads = graph.group("attn.qkv")
    assert heads.units == 4
    assert {(m.layer, m.kind) for m in heads.members} == {("attn.qkv", "out"), ("attn.proj", "in")}
    assert graph.base_macs == flop_counter_macs(model, x[:1])
    # Heads 1 and 3 of q, k and v zeroed: removing them leaves the outputs unchanged.
    zero_units(model, graph, {heads.index: np.array([1, 3])})
    with torch.no_grad():
        reference = model(x)
    pruned = prune_env.prune_channels(model, graph, {heads.index: np.array([0, 2])}).eval()
    assert pruned.attn.num_heads == 2 and pruned.attn.qkv.out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference, rtol=1e-12, atol=1e-12)
    counts = np.array([g.units for g in graph.groups])
    counts[heads.index] = 2
    assert graph.costs.macs(counts) == flop_counter_macs(pruned, x[:1]) == prune_env.count_macs(pruned, x[:1])
    # Uniform pruning of every group, the embedding width included.
    small = prune_env.prune(model, x[:1], 0.5, graph=graph)
    assert graph.macs(0.5) == flop_counter_macs(small, x[:1]) < graph.base_macs
    assert not any(name.startswith("_tensor_constant") for name in vars(model))  # the model is untouched


def test_undeclared_literal_head_count_freezes_the_heads_with_a_warning() -> None:
    model = Encoder(fused=True, declared=False).eval()
    x = torch.randn(1, 5, 8)
    with pytest.warns(UserWarning, match="literal channel size"):
        graph = prune_env.build_graph(model, x)
    assert "attn.qkv" not in {g.name for g in graph.groups}
    small = prune_env.prune(model, x, 0.5, graph=graph)
    assert graph.macs(0.5) == flop_counter_macs(small, x)


def test_matmul_with_a_weight_tensor_is_exact() -> None:
    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.weight = nn.Parameter(torch.randn(8, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten(2).transpose(1, 2) @ self.weight

    model = Projection().eval()
    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = prune_env.build_graph(model, x)
    assert graph.base_macs == flop_counter_macs(model, x)
    small = prune_env.prune(model, x, 0.5, graph=graph) if graph.groups else model
    assert graph.macs(0.5) == flop_counter_macs(small, x)


def test_split_axis_needs_resize() -> None:
    with pytest.raises(prune_env.InvalidSettingError, match="split_axis"):
        prune_env.register_layer(SelfAttention, prune_env.LayerSpec(like=nn.Linear, split_axis=-2))  # type: ignore[type-abstract]
