"""The checks a YOLO model must pass when pruned uniformly, run by tests/test_ultralytics.py in a child
process: importing Ultralytics patches ``PIL.Image.open`` for the whole process, which other tests' image
loading must not see."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
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


def _tiny_dataset(root: Path, size: int, segment: bool) -> Path:
    """Four images of one bright rectangle, labelled in Ultralytics' format (a box, or for segmentation
    the rectangle's polygon), and the data YAML naming them; written under ``root``."""
    from PIL import Image

    images, labels = root / "images" / "val", root / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    top, bottom, left, right = size // 6, size // 2, size // 3, 3 * size // 4
    image = np.zeros((size, size, 3), np.uint8)
    image[top:bottom, left:right] = 255
    x0, x1, y0, y1 = left / size, right / size, top / size, bottom / size
    if segment:
        label = f"0 {x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}\n"
    else:
        label = f"0 {(x0 + x1) / 2} {(y0 + y1) / 2} {x1 - x0} {y1 - y0}\n"
    for i in range(4):
        Image.fromarray(image).save(images / f"{i}.png")
        (labels / f"{i}.txt").write_text(label)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames:\n  0: box\n  1: other\n")
    return data


def check_pruned_yolo(config: str, workdir: str, size: int = 64, ratio: float = 0.5) -> float:
    """Prune a YOLO model uniformly: exact MACs and parameters, the same output shapes, the head's format
    channels whole, Ultralytics' own loss finite with a backward pass, its predict and val paths accepting
    the pruned model (val on a tiny dataset written under ``workdir``, where Ultralytics also writes), the
    original untouched. Returns the fraction of MACs kept."""
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
    pruned_params = sum(p.numel() for p in pruned.parameters())
    data = _tiny_dataset(Path(workdir) / "data", size, segment=config.endswith("-seg.yaml"))
    metrics = yolo.val(data=str(data), imgsz=size, batch=2, device="cpu", workers=0, plots=False,
                       verbose=False, project=str(Path(workdir) / "runs"))  # fmt: skip
    scores = metrics.results_dict
    assert 0.0 <= scores["metrics/mAP50-95(B)"] <= 1.0 and math.isfinite(scores["fitness"])
    assert ("metrics/mAP50-95(M)" in scores) == config.endswith("-seg.yaml")
    # val fuses each convolution with its BatchNorm in place: the pruned weights, fewer of them.
    assert sum(p.numel() for p in yolo.model.parameters()) <= pruned_params
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return measured / base
