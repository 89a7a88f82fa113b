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
FAST = [
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
SLOW = sorted(set(ALL) - set(FAST))


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


@pytest.mark.parametrize("name", FAST)
def test_torchvision_fast_subset(name: str) -> None:
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_torchvision_full_sweep(name: str) -> None:
    check_model(name)


def test_fast_subset_is_part_of_the_zoo() -> None:
    assert set(FAST) <= set(ALL)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "max_kept"), [("vit_b_16", 0.6), ("swin_t", 0.7), ("maxvit_t", 0.6)])
def test_torchvision_transformers_prune_exactly(name: str, max_kept: float) -> None:
    """Transformers prune exactly, attention matmuls included in the MACs: vit_b_16 by heads (its
    nn.MultiheadAttention ties the heads to the embedding width) and MLP widths; swin_t and maxvit_t by
    their MLP widths only (their attention sizes heads from the embedding width by code the engine does not
    map: a traced-out function, an einsum), so swin_t keeps more than 0.6 of its MACs."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    assert check_pruned_model(name, model, 224) <= max_kept


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
