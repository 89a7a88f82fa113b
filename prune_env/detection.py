"""Object detection data for a search: checked samples, a synthetic set, mAP, and a training loop.

A detection sample is ``(image, target)`` as torchvision's detectors take it: ``image`` a float tensor
``(C, H, W)``, ``target`` a dict with ``boxes`` (``(N, 4)`` float, ``x1, y1, x2, y2`` in pixels) and
``labels`` (``(N,)`` integers, 0 being the background class torchvision reserves). An image with no object
(``N = 0``) is normal; a malformed box is refused naming the sample (:func:`check_detection_samples`).

:func:`mean_average_precision` is the metric a search scores a pruned detector with (through
:class:`~prune_env.metric_proxy.MetricProxy`, on a validation set): PASCAL VOC's all-point interpolated
average precision at one IoU threshold, averaged over the classes present. It is written here, in a few
lines, rather than taken from a library: the usual implementations need ``pycocotools`` (a compiled
dependency) and COCO-format annotations for a number the tests must be able to recompute by hand.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from prune_env.device import resolve_device, seed_generators
from prune_env.errors import DatasetError, InvalidSettingError, UnknownNameError
from prune_env.validation import as_real, check_settings, int_at_least

Target = dict[str, torch.Tensor]
Sample = tuple[torch.Tensor, Target]


def check_detection_samples(samples: Sequence[Sample], name: str = "samples") -> None:
    """Refuse a malformed sample, naming it: an image that is not a ``(C, H, W)`` float tensor, a target
    without ``boxes`` and ``labels``, boxes that are not ``(N, 4)`` finite numbers with ``x1 < x2`` and
    ``y1 < y2`` inside the image, labels that are not ``N`` integers ≥ 1. No boxes at all is accepted."""
    if isinstance(samples, (torch.Tensor, str, bytes)) or not hasattr(samples, "__len__"):
        raise InvalidSettingError(
            f"{name} must be a sequence of (image, target) pairs, got {type(samples).__name__}"
        )
    if len(samples) == 0:
        raise InvalidSettingError(f"{name} is empty: give at least one (image, target) pair")
    for i, sample in enumerate(samples):
        where = f"{name}[{i}]"
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise DatasetError(f"{where} must be an (image, target) pair, got {type(sample).__name__}")
        image, target = sample
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
            got = (
                f"{tuple(image.shape)} {image.dtype}"
                if isinstance(image, torch.Tensor)
                else type(image).__name__
            )
            raise DatasetError(f"{where}: the image must be a float tensor (C, H, W), got {got}")
        if not isinstance(target, dict) or not {"boxes", "labels"} <= target.keys():
            raise DatasetError(f"{where}: the target must be a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
            got = str(tuple(boxes.shape)) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise DatasetError(f"{where}: boxes must be an (N, 4) tensor of x1, y1, x2, y2, got {got}")
        if (
            not isinstance(labels, torch.Tensor)
            or labels.shape != (len(boxes),)
            or (len(boxes) > 0 and labels.is_floating_point())  # no boxes: torch.tensor([]) is fine
        ):
            got = (
                f"{tuple(labels.shape)} {labels.dtype}"
                if isinstance(labels, torch.Tensor)
                else type(labels).__name__
            )
            raise DatasetError(f"{where}: labels must be {len(boxes)} integers (one per box), got {got}")
        if len(boxes) == 0:
            continue
        h, w = image.shape[1:]
        b = boxes.double()
        bad = ~torch.isfinite(b).all(1) | (b[:, 0] >= b[:, 2]) | (b[:, 1] >= b[:, 3])
        bad |= (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
        if bad.any():
            j = int(torch.nonzero(bad)[0])
            raise DatasetError(
                f"{where}: box {j} is {boxes[j].tolist()}: boxes must be finite x1 < x2, y1 < y2 inside the "
                f"{w}×{h} image (x1, y1, x2, y2 in pixels)"
            )
        if (labels < 1).any():
            raise DatasetError(
                f"{where}: labels must be ≥ 1 (0 is the background class), got {labels.tolist()}"
            )


def synthetic_shapes(n: int, size: int = 64, *, max_objects: int = 3, seed: int = 0) -> list[Sample]:
    """``n`` images of filled squares (label 1) and discs (label 2) on a noisy background, with their
    boxes: a detection set made in a second, for tests and examples. About one image in eight has no
    object."""
    check_settings({"seed": seed, "max_objects": max_objects})
    int_at_least("n", n, 1)
    int_at_least("size", size, 16)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    samples: list[Sample] = []
    for _ in range(n):
        image = rng.normal(0.3, 0.05, (3, size, size))
        boxes, labels = [], []
        for _ in range(int(rng.integers(0, max_objects + 1)) if rng.random() > 0.125 else 0):
            side = int(rng.integers(size // 6, size // 3))
            x1, y1 = (int(v) for v in rng.integers(0, size - side, 2))
            label = int(rng.integers(1, 3))
            if label == 1:
                mask = (xx >= x1) & (xx < x1 + side) & (yy >= y1) & (yy < y1 + side)
            else:
                r = side / 2
                mask = (xx - x1 - r) ** 2 + (yy - y1 - r) ** 2 <= r * r
            image[:, mask] = rng.uniform(0.6, 1.0, (3, 1))
            boxes.append([x1, y1, x1 + side, y1 + side])
            labels.append(label)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        samples.append((torch.from_numpy(image.clip(0, 1)).float(), target))
    return samples


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


def torchvision_detector(name: str, size: int = 128, num_classes: int = 5) -> nn.Module:
    """A torchvision detector by name (``torchvision.models.detection``) with random weights (the same on
    every call: seeded, without touching the caller's random state), at ``size`` pixels (SSD's own sizes for
    SSD), whose RoI and detection counts do not depend on its weights, so a pruned copy runs the same number
    of RoIs through its heads: the proposal and box regressors are zero (boxes are the anchors and proposals
    themselves), and no score threshold or suppression removes a box. With them the MACs of a two-stage
    detector's RoI heads are comparable before and after pruning; without them the count of RoIs that
    survive NMS changes with the weights."""
    from torchvision.models import detection, list_models

    known = list_models(module=detection)
    if name not in known:
        raise UnknownNameError(f"unknown torchvision detector {name!r}; known: {', '.join(known)}")
    int_at_least("size", size, 16)
    check_settings({"num_classes": num_classes})
    kwargs: dict[str, object] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if not name.startswith("ssd"):
        kwargs.update(min_size=size, max_size=size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
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


def example_targets(name: str, size: int) -> list[Target]:
    """Targets for two images of the torchvision detector ``name`` in train mode: one box each, with a
    mask or keypoints where the model predicts them (``size`` ≥ 96 pixels)."""
    target: Target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])}
    if name.startswith("maskrcnn"):
        mask = torch.zeros(1, size, size, dtype=torch.uint8)
        mask[0, 20:90, 10:60] = 1
        target["masks"] = mask
    if name.startswith("keypointrcnn"):
        target["keypoints"] = torch.tensor([[[20.0 + 2 * k, 30.0 + k, 1.0] for k in range(17)]])
    return [target, target]


class _Backbone(nn.Sequential):
    out_channels: int  # what torchvision's detectors read of their backbone


def tiny_detector(num_classes: int = 3, size: int = 64, width: int = 32) -> nn.Module:
    """A small FCOS (torchvision's anchor-free detector) for ``size``-pixel images: a five-convolution
    backbone of ``width`` channels at stride 8 and a two-convolution head, with random weights. On
    :func:`synthetic_shapes` it reaches a useful mAP in seconds on a CPU (``num_classes`` counts the
    background: 3 for the two shapes)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    check_settings({"num_classes": num_classes})
    int_at_least("size", size, 16)
    if int_at_least("width", width, 16) % 16:
        raise InvalidSettingError(
            f"width must be a multiple of 16 (the head's GroupNorm groups), got {width}"
        )

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )

    backbone = _Backbone(
        block(3, width // 2, 2), block(width // 2, width, 2), block(width, width, 1), block(width, width, 2),
        block(width, width, 1),
    )  # fmt: skip
    backbone.out_channels = width
    return FCOS(
        backbone,
        num_classes=num_classes,
        min_size=size,
        max_size=size,
        image_mean=[0.3] * 3,
        image_std=[0.25] * 3,
        anchor_generator=AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),)),
        head=FCOSHead(width, 1, num_classes, num_convs=2),
        detections_per_img=20,
        score_thresh=0.05,
    ).eval()


def _batches(samples: Sequence[Sample], batch_size: int) -> Any:
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        yield [s[0] for s in chunk], [s[1] for s in chunk]


def _average_precision(scores: np.ndarray, hits: np.ndarray, positives: int) -> float:
    """VOC's all-point interpolated AP of detections (``scores``, ``hits``: matched a ground truth)."""
    if positives == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / positives
    # The precision envelope (highest precision at any recall at least this one), integrated over recall.
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(order) else precision
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


@torch.inference_mode()
def mean_average_precision(
    model: nn.Module, samples: Sequence[Sample], *, iou: float = 0.5, batch_size: int = 8
) -> float:
    """mAP at ``iou`` of ``model`` (a torchvision-style detector, in eval mode) on ``samples``: each class's
    VOC all-point AP, a detection matching the highest-IoU unmatched ground truth box of its class at or
    above ``iou``, averaged over the classes that have ground truth boxes. A number in [0, 1]."""
    check_settings({"batch_size": batch_size})
    if not 0 < as_real("iou", iou) <= 1:
        raise InvalidSettingError(f"iou must be in (0, 1], got {iou!r}")
    device = next(model.parameters()).device
    per_class: dict[int, tuple[list[float], list[bool]]] = {}
    positives: dict[int, int] = {}
    for images, targets in _batches(samples, batch_size):
        outputs = model([im.to(device) for im in images])
        for out, target in zip(outputs, targets, strict=True):
            for c in target["labels"].tolist():
                positives[c] = positives.get(c, 0) + 1
            boxes, scores, labels = (out[k].detach().cpu() for k in ("boxes", "scores", "labels"))
            for c in labels.unique().tolist():
                mine = labels == c
                truth = target["boxes"][target["labels"] == c]
                order = torch.argsort(scores[mine], descending=True, stable=True)
                found, hits = boxes[mine][order], torch.zeros(len(order), dtype=torch.bool)
                if len(truth):
                    overlaps = box_iou(found, truth)
                    taken = torch.zeros(len(truth), dtype=torch.bool)
                    for d in range(len(found)):
                        candidates = overlaps[d].masked_fill(taken, -1.0)
                        best = int(candidates.argmax())
                        if candidates[best] >= iou:
                            hits[d], taken[best] = True, True
                listed = per_class.setdefault(c, ([], []))
                listed[0].extend(scores[mine][order].tolist())
                listed[1].extend(hits.tolist())
    aps = [
        _average_precision(
            np.array(per_class.get(c, ([], []))[0]), np.array(per_class.get(c, ([], []))[1]), n
        )
        for c, n in sorted(positives.items())
    ]
    return float(np.mean(aps)) if aps else 0.0


def train_detector(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> nn.Module:
    """A trained copy of ``model`` (the argument is not changed): SGD with momentum and a cosine schedule
    on the sum of the losses the detector returns in train mode, ``epochs`` passes over ``samples``
    (shuffled by ``seed``). Returned in eval mode."""
    check_detection_samples(samples)
    if check_settings({"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr})["lr"] == 0:
        raise InvalidSettingError("lr must be above 0, got 0: a detector trained at lr 0 does not change")
    target_device = resolve_device(device)
    seed_generators(seed, target_device)
    trained = copy.deepcopy(model).to(target_device).train()
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * math.ceil(len(samples) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order_rng = np.random.default_rng(seed)
    with tqdm(total=steps, desc="train detector", disable=not progress, leave=False, unit="step") as bar:
        for _ in range(epochs):
            order = order_rng.permutation(len(samples))
            for images, targets in _batches([samples[i] for i in order], batch_size):
                losses = trained(
                    [im.to(target_device) for im in images],
                    [{k: v.to(target_device) for k, v in t.items()} for t in targets],
                )
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise DatasetError(f"the detector's loss became {float(loss)}: lower lr (now {lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return trained.eval()


__all__ = [
    "PREDICTOR_SUFFIXES",
    "check_detection_samples",
    "example_targets",
    "mean_average_precision",
    "synthetic_shapes",
    "tiny_detector",
    "torchvision_detector",
    "train_detector",
]
