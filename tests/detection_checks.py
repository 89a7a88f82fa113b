"""The checks every torchvision detection or segmentation model must pass when pruned uniformly."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchvision.models import detection, segmentation

import prune_env

# Output widths that are a format, not features: kept whole by the graph because post-processing slices,
# splits or indexes them; they must come out of pruning at their full width.
PREDICTOR_SUFFIXES = (
    "cls_logits",
    "bbox_pred",
    "cls_score",
    "mask_fcn_logits",
    "kps_score_lowres",
    "bbox_ctrness",
)


def detector(name: str, size: int = 128, num_classes: int = 5) -> nn.Module:
    """A torchvision detector with random weights, at ``size`` pixels, whose RoI and detection counts do not
    depend on its weights, so a pruned copy runs the same number of RoIs through its heads: the proposal
    and box regressors are zero (boxes are the anchors and proposals themselves), and no score threshold or
    suppression removes a box. With them the MACs of a two-stage detector's RoI heads are comparable before
    and after pruning; without them the count of RoIs that survive NMS changes with the weights."""
    torch.manual_seed(0)
    kwargs: dict[str, object] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if not name.startswith("ssd"):
        kwargs.update(min_size=size, max_size=size)
    model: nn.Module = getattr(detection, name)(**kwargs).eval()
    for part in (model, getattr(model, "rpn", None), getattr(model, "roi_heads", None)):
        if part is not None and hasattr(part, "nms_thresh"):
            part.nms_thresh = 1.0
        if part is not None and hasattr(part, "score_thresh"):
            part.score_thresh = 0.0
    for module_name, module in model.named_modules():
        if module_name.endswith(("rpn.head.bbox_pred", "box_predictor.bbox_pred")):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def targets(name: str, size: int) -> list[dict[str, torch.Tensor]]:
    """One box per image, with a mask or keypoints where the model predicts them."""
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])}
    if name.startswith("maskrcnn"):
        mask = torch.zeros(1, size, size, dtype=torch.uint8)
        mask[0, 20:90, 10:60] = 1
        target["masks"] = mask
    if name.startswith("keypointrcnn"):
        target["keypoints"] = torch.tensor([[[20.0 + 2 * k, 30.0 + k, 1.0] for k in range(17)]])
    return [target, target]


def pruned_exactly(model: nn.Module, example: Any, ratio: float) -> tuple[nn.Module, int, int]:
    """``model`` pruned uniformly at ``ratio`` on ``example`` (its arguments, or one tensor), with the
    graph's MACs and parameters checked against a count on the pruned model and the unpruned model's MACs
    against the graph's. Returns the pruned model, its MACs and the unpruned model's."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # post-processing's slicing and reshapes leave format channels unmapped
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
    model = detector(name, size)
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
    losses = pruned([images[0], images[0]], targets(name, size))
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
