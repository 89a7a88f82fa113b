"""Every torchvision classification CNN prunes into a valid, smaller model of exactly predicted cost."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from zoo_checks import check_pruned_model

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
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "maxvit_t"])
def test_torchvision_transformers_prune_exactly(name: str) -> None:
    """Transformers prune exactly (today their MLP hidden widths; attention heads and the embedding width
    are not groups yet), attention matmuls included in the MACs."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    check_pruned_model(name, model, 224)
