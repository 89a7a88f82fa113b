"""The checks every torchvision detection or segmentation model must pass when pruned uniformly."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchvision.models import segmentation

import prune_env
from prune_env.detection import PREDICTOR_SUFFIXES, example_targets, torchvision_detector


def pruned_exactly(model: nn.Module, example: Any, ratio: float) -> tuple[nn.Module, int, int]:
    """``model`` pruned uniformly at ``ratio`` on ``example`` (its arguments, or one tensor), with the
    graph's MACs and parameters checked against a count on the pruned model and the unpruned model's MACs
    against the graph's. Returns the pruned model, its MACs and the unpruned model's."""
    with warnings.catch_warnings():
        # Post-processing's slicing and reshapes leave format channels unmapped, by design.
        warnings.simplefilter("ignore")
        graph = prune_env.build_graph(model, example)
    assert graph.base_macs == prune_env.count_macs(model, example)
    pruned = prune_env.prune(model, example, ratio, graph=graph)
    measured = prune_env.count_macs(pruned, example)
    assert graph.macs(ratio) == measured < graph.base_macs
    assert graph.params(ratio) == prune_env.count_params(pruned) < prune_env.count_params(model)
    return pruned, measured, graph.base_macs


def check_pruned_detector(name: str, size: int = 128, ratio: float = 0.5) -> float:
    """Prune a detector uniformly at ``ratio``: predicted MACs and parameters equal a count on the pruned
    model, its predictors keep their full width, in eval mode it returns the model's own output format, in
    train mode with targets its losses are finite and backward runs, and the input model is untouched.
    Returns the fraction of MACs kept."""
    model = torchvision_detector(name, size)
    images = [torch.rand(3, size, size)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, measured, base = pruned_exactly(model, (images,), ratio)
    full = dict(model.named_modules())
    for module_name, module in pruned.named_modules():
        if module_name.endswith(PREDICTOR_SUFFIXES):
            width = "out_features" if isinstance(module, nn.Linear) else "out_channels"
            assert getattr(module, width) == getattr(full[module_name], width), module_name

    with torch.no_grad():
        expected, got = model(images)[0], pruned.eval()(images)[0]
    assert expected.keys() == got.keys()
    assert all(got[k].shape[1:] == expected[k].shape[1:] for k in got)
    assert torch.isfinite(got["boxes"]).all()

    pruned.train()
    losses = pruned([images[0], images[0]], example_targets(name, size))
    loss = sum(losses.values())
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad and p.grad is not None)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    return measured / base


def check_pruned_segmenter(name: str, size: int = 64, ratio: float = 0.5) -> float:
    """As :func:`check_pruned_detector`, for a segmentation model (a tensor in, ``{"out": ...}`` out)."""
    torch.manual_seed(0)
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=5).eval()
    x = torch.randn(1, 3, size, size)
    pruned, measured, base = pruned_exactly(model, x, ratio)
    with torch.no_grad():
        expected, got = model(x), pruned.eval()(x)
    assert expected.keys() == got.keys() and all(got[k].shape == expected[k].shape for k in got)
    pruned.train()
    out = pruned(torch.randn(2, 3, size, size))["out"]
    assert out.shape == (2, 5, size, size) and torch.isfinite(out).all()
    return measured / base
