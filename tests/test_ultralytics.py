"""Ultralytics' YOLO detectors and segmenters, built from the package's own YAML configurations with random
weights: pruned with exact MACs, with their own output format, their own loss and their own predict and val
paths.

The Detect head's box branch ends in ``4 × reg_max`` channels that Distribution Focal Loss reshapes into
``(4, reg_max)``: a literal size, so the engine keeps those channels (and the class channels) whole.

Each check runs in a child process (tests/ultralytics_checks.py): importing Ultralytics patches
``PIL.Image.open`` process-wide (to add HEIF support), which changes what other tests' image loading
raises."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="needs ultralytics")

MODELS = ["yolov8n.yaml", "yolo11n.yaml", "yolov8n-seg.yaml", "yolo11n-seg.yaml"]
TESTS = Path(__file__).resolve().parent


def _in_child(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter in ``tmp_path`` (where Ultralytics keeps its settings and writes
    its runs), offline, the tests importable; its standard output, or a failure showing its standard error."""
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path), "YOLO_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    )}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _kept(config: str, tmp_path: Path) -> float:
    code = f"from ultralytics_checks import check_pruned_yolo; print(check_pruned_yolo({config!r}, {str(tmp_path)!r}))"
    return float(_in_child(code, tmp_path).split()[-1])


def test_yolov8n_prunes_exactly_and_runs_through_ultralytics(tmp_path: Path) -> None:
    assert _kept("yolov8n.yaml", tmp_path) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("config", MODELS)
def test_every_yolo_model_prunes_exactly_and_runs_through_ultralytics(config: str, tmp_path: Path) -> None:
    assert _kept(config, tmp_path) < 0.6


def test_the_library_does_not_import_ultralytics(tmp_path: Path) -> None:
    code = "import sys, prune_env, agents; prune_env.build_graph; print('ultralytics' in sys.modules)"
    assert _in_child(code, tmp_path).strip() == "False"
