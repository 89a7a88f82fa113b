"""Every torchvision classification CNN prunes into a valid, smaller model of exactly predicted cost."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

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


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def check_model(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's init notice for googlenet/inception
        model = torchvision.models.get_model(name, weights=None).eval()
    res = resolution(name)
    x = torch.randn(1, 3, res, res)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    graph = prune_env.build_graph(model, x)
    assert graph.groups, f"{name}: no prunable group found"
    assert graph.base_macs == flop_counter_macs(model, x)
    pruned = prune_env.prune(model, x, 0.5, graph=graph).eval()

    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    measured = prune_env.count_macs(pruned, x)
    assert graph.macs(0.5) == measured == flop_counter_macs(pruned, x)
    assert graph.params(0.5) == prune_env.count_params(pruned) < prune_env.count_params(model)
    assert measured < graph.base_macs
    # Training mode runs too (auxiliary heads, dropout, batch statistics).
    pruned.train()
    out = pruned(torch.randn(2, 3, res, res))
    # With auxiliary heads (GoogLeNet, Inception) training mode returns a tuple led by the logits.
    logits = out if isinstance(out, torch.Tensor) else out[0]
    assert logits.shape == (2, model(x).shape[1])
    assert torch.isfinite(logits).all()
    # The input model is bit-identical and still in eval mode.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


@pytest.mark.parametrize("name", FAST)
def test_torchvision_fast_subset(name: str) -> None:
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_torchvision_full_sweep(name: str) -> None:
    check_model(name)


def test_fast_subset_is_part_of_the_zoo() -> None:
    assert set(FAST) <= set(ALL)
