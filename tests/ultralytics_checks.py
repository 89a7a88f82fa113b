"""The checks a YOLO model must pass when pruned uniformly, run by tests/test_ultralytics.py in a child
process: importing Ultralytics patches ``PIL.Image.open`` for the whole process, which other tests' image
loading must not see."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from detection_checks import pruned_exactly


def _yolo(config: str) -> Any:  # ultralytics' YOLO
    from ultralytics import YOLO

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return YOLO(config)


def _shapes(output: object) -> list[tuple[int, ...]]:
    """The tensor shapes of an eval-mode output: (predictions, ...) or (predictions, features...)."""
    first = output[0] if isinstance(output, tuple) else output
    items = first if isinstance(first, (list, tuple)) else [first]
    return [tuple(t.shape) for t in items if isinstance(t, torch.Tensor)]


def check_pruned_yolo(config: str, size: int = 64, ratio: float = 0.5) -> float:
    """Prune a YOLO model uniformly: exact MACs and parameters, the same output shapes, the head's format
    channels whole, Ultralytics' own loss finite with a backward pass, its predict path accepting the
    pruned model, the original untouched. Returns the fraction of MACs kept."""
    from ultralytics.cfg import get_cfg

    yolo = _yolo(config)
    model = yolo.model.eval()
    x = torch.rand(1, 3, size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, measured, base = pruned_exactly(model, x, ratio)  # the DFL reshape's channels stay, by design
    with torch.no_grad():
        assert _shapes(pruned.eval()(x)) == _shapes(model(x))
    head, pruned_head = model.model[-1], pruned.model[-1]
    for branch in ("cv2", "cv3"):  # box (4 × reg_max) and class outputs of every level
        for full, small in zip(getattr(head, branch), getattr(pruned_head, branch), strict=True):
            assert full[-1].out_channels == small[-1].out_channels

    pruned.args = get_cfg()  # the loss reads its gains from the training settings
    pruned.train()
    batch = {
        "img": torch.rand(2, 3, size, size),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[1.0], [3.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.4, 0.2, 0.5]]),  # normalised x, y, w, h
    }
    if config.endswith("-seg.yaml"):
        batch["masks"] = torch.zeros(2, size // 4, size // 4)
        batch["masks"][0, 4:12, 4:12] = 1
        batch["masks"][1, 2:10, 6:14] = 2
    loss, _ = pruned.loss(batch)
    assert torch.isfinite(loss).all()
    loss.sum().backward()

    yolo.model = pruned.eval()
    results = yolo.predict(np.zeros((size, size, 3), np.uint8), imgsz=size, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return measured / base
