"""Every torchvision classification CNN prunes into a valid, smaller model of exactly predicted cost."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from zoo_checks import check_pruned_model, flop_counter_macs

import prune_env

# A representative, fast subset covering every coupling kind: residual adds (resnet), concat (densenet,
# googlenet), chunk + channel shuffle (shufflenet), depthwise + squeeze-excite (mobilenet_v3, efficientnet),
# grouped convs + SE (regnet), fire modules (squeezenet), LayerNorm + permute + layer scale (convnext),
# training-only auxiliary heads (googlenet).
QUICK_MODELS = [
    "resnet18",
    "densenet121",
    "googlenet",
    "shufflenet_v2_x0_5",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "squeezenet1_1",
    "convnext_tiny",
]
SKIP_PREFIXES = ("vit_", "swin_", "maxvit_")
ALL = [
    n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(SKIP_PREFIXES)
]
SLOW = sorted(set(ALL) - set(QUICK_MODELS))


def resolution(name: str) -> int:
    if name.startswith("inception"):
        return 299  # its training-only auxiliary head needs 17×17 features
    if name.startswith(("googlenet", "squeezenet", "alexnet")):
        return 64
    return 32


def check_model(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's init notice for googlenet/inception
        model = torchvision.models.get_model(name, weights=None).eval()
    check_pruned_model(name, model, resolution(name))


@pytest.mark.parametrize("name", QUICK_MODELS)
def test_torchvision_fast_subset(name: str) -> None:
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_torchvision_full_sweep(name: str) -> None:
    check_model(name)


def test_fast_subset_is_part_of_the_zoo() -> None:
    assert set(QUICK_MODELS) <= set(ALL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"])
def test_torchvision_transformers_prune_exactly(name: str) -> None:
    """Transformers prune exactly, attention matmuls included in the MACs: vit_b_16 and Swin (V1, V2) by
    heads (their attention ties the heads to the embedding width) and MLP widths; maxvit_t by its MLP widths
    (its attention sizes heads with an einsum the engine does not map)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    assert check_pruned_model(name, model, 224) <= 0.6


@pytest.mark.parametrize("v2", [False, True])
def test_swin_window_attention_prunes_whole_heads_with_padding(v2: bool) -> None:
    """torchvision's Swin attention (kept whole: its function pads and shifts by the input size): a head and
    its head_dim embedding channels are one unit in every block of a stage; the head's column of the
    relative-position table (V1), or its logit scale and bias-MLP output (V2), go with it and num_heads
    follows. At 36 px the 9 x 9 tokens are padded to whole windows and patch merging pads an odd size: the
    MACs stay exact."""
    from torchvision.models import swin_transformer as swin

    blocks = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    torch.manual_seed(0)
    model = swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 1],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=5,
        **blocks,
    ).eval()
    x = torch.randn(1, 3, 36, 36)
    graph = prune_env.build_graph(model, x)
    assert graph.base_macs == flop_counter_macs(model, x)
    first, second = graph.group("features.0.0"), graph.group("features.2.reduction")
    assert (first.units, second.units) == (2, 4)  # the heads of each stage
    assert sum(m.layer_type.startswith("ShiftedWindowAttention") for m in first.members) == 2
    pruned = prune_env.prune_channels(
        model, graph, {first.index: np.array([1]), second.index: np.array([0, 2, 3])}
    ).eval()
    for stage, heads in ((pruned.features[1], 1), (pruned.features[3], 3)):
        for block in stage:
            attn = block.attn
            assert attn.num_heads == heads
            per_head = attn.logit_scale.shape[0] if v2 else attn.relative_position_bias_table.shape[1]
            assert per_head == heads
            if v2:
                assert attn.cpb_mlp[2].out_features == heads
            assert attn.qkv.out_features == 3 * attn.qkv.in_features == 3 * 8 * heads
    counts = np.array([g.units for g in graph.groups])
    counts[[first.index, second.index]] = [1, 3]
    assert graph.costs.macs(counts) == flop_counter_macs(pruned, x) == prune_env.count_macs(pruned, x)
    assert pruned(x).shape == (1, 5)
    pruned.train()(torch.randn(2, 3, 36, 36)).sum().backward()
    assert model.features[1][0].attn.num_heads == 2  # the input model keeps its heads


def test_multihead_attention_vit_prunes_whole_heads() -> None:
    """torchvision's ViT (nn.MultiheadAttention): a head and its head_dim embedding channels are one unit in
    every block; the pruned model runs with fewer heads and exactly the predicted MACs."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48, num_classes=5
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = prune_env.build_graph(model, x)
    embedding = graph.group("conv_proj")
    assert embedding.units == 4  # the heads, each with its 8 channels of the embedding
    attention = [m for m in embedding.members if m.layer_type == "MultiheadAttention"]
    assert len(attention) == 4 and all(m.multiplicity in (8, 24) for m in attention)  # inputs, q/k/v rows
    pruned = prune_env.prune_channels(model, graph, {embedding.index: np.array([0, 3])}).eval()
    for block in pruned.encoder.layers:
        mha = block.self_attention
        assert (mha.num_heads, mha.embed_dim, mha.head_dim) == (2, 16, 8)
    counts = np.array([g.units for g in graph.groups])
    counts[embedding.index] = 2
    assert graph.costs.macs(counts) == flop_counter_macs(pruned, x) == prune_env.count_macs(pruned, x)
    assert pruned(x).shape == (1, 5)
    pruned.train()(torch.randn(2, 3, 32, 32)).sum().backward()
