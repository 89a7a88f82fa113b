"""Ultralytics' YOLO detectors and segmenters, built from the package's own YAML configurations with random
weights: pruned with exact MACs, with their own output format, their own loss and their own predict path.

The Detect head's box branch ends in ``4 × reg_max`` channels that Distribution Focal Loss reshapes into
``(4, reg_max)``: a literal size, so the engine keeps those channels (and the class channels) whole."""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import prune_env

pytest.importorskip("ultralytics")


@pytest.fixture(autouse=True)
def _offline_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ultralytics writes a settings file under the user's home and may look online: neither here.
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
    monkeypatch.setenv("YOLO_OFFLINE", "1")


MODELS = ["yolov8n.yaml", "yolo11n.yaml", "yolov8n-seg.yaml", "yolo11n-seg.yaml"]


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the DFL reshape's literal size: those channels stay, by design
        graph = prune_env.build_graph(model, x)
    assert graph.base_macs == prune_env.count_macs(model, x)
    pruned = prune_env.prune(model, x, ratio, graph=graph)
    measured = prune_env.count_macs(pruned, x)
    assert graph.macs(ratio) == measured < graph.base_macs
    assert graph.params(ratio) == prune_env.count_params(pruned) < prune_env.count_params(model)
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
    return measured / graph.base_macs


def test_yolov8n_prunes_exactly_and_runs_through_ultralytics() -> None:
    assert check_pruned_yolo("yolov8n.yaml") < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("config", MODELS)
def test_every_yolo_model_prunes_exactly_and_runs_through_ultralytics(config: str) -> None:
    assert check_pruned_yolo(config) < 0.6


def test_the_library_does_not_import_ultralytics() -> None:
    code = "import sys, prune_env, agents; prune_env.build_graph; print('ultralytics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
