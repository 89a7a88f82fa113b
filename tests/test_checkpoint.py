"""Saving and reloading pruned models: identical outputs, safe loading, user-defined architectures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prune_env
from prune_env.checkpoint import SPEC_FILE, WEIGHTS_FILE, kept_units, load_pruned, read_spec, save_pruned
from prune_env.data import Splits
from prune_env.errors import PruneEnvError
from prune_env.graph import build_graph
from prune_env.models import get_model
from prune_env.problem import PruningProblem
from prune_env.surgery import prune_channels


def _random_keep(graph: prune_env.DependencyGraph, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {
        g.name: sorted(rng.choice(g.units, max(1, g.units // 2), replace=False).tolist())
        for g in graph.groups
    }


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_zoo_model_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = get_model("resnet20", num_classes=10, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, 1, 8, 8))
    keep = _random_keep(graph, seed=1)  # arbitrary, not top-k: the saved indices must be used as they are
    pruned = prune_channels(base, graph, keep).eval()
    save_pruned(tmp_path / "m", pruned, keep=keep, input_shape=(1, 8, 8), architecture="resnet20",
                num_classes=10, in_channels=1, meta={"note": np.float32(1.5)})  # fmt: skip

    loaded = prune_env.load_pruned(tmp_path / "m")
    x = torch.randn(5, 1, 8, 8)
    assert type(loaded) is type(pruned)
    assert not loaded.training
    assert torch.equal(_outputs(loaded, x), _outputs(pruned, x))
    assert prune_env.count_params(loaded) == prune_env.count_params(pruned)

    # A second round trip changes nothing either.
    spec = read_spec(tmp_path / "m")
    save_pruned(tmp_path / "again", loaded, keep=spec["keep"], input_shape=spec["input_shape"],
                architecture="resnet20", num_classes=10, in_channels=1)  # fmt: skip
    assert torch.equal(_outputs(load_pruned(tmp_path / "again" / SPEC_FILE), x), _outputs(pruned, x))
    assert spec["meta"] == {"note": 1.5}
    assert "torch" in spec["versions"]


def test_weights_are_plain_tensors(tmp_path: Path) -> None:
    """model.pt must load with weights_only=True: no pickled module or code in the file."""
    base = get_model("tiny", num_classes=3, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, 1, 8, 8))
    keep = _random_keep(graph, seed=0)
    save_pruned(tmp_path, prune_channels(base, graph, keep), keep=keep, input_shape=(1, 8, 8),
                architecture="tiny", num_classes=3, in_channels=1)  # fmt: skip
    state = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads((tmp_path / SPEC_FILE).read_text())["architecture"] == "tiny"


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                      nn.Conv2d(12, 20, 3, padding=1), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_user_model_needs_its_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = UserNet().eval()
    graph = build_graph(base, torch.zeros(1, 1, 6, 6))
    keep = _random_keep(graph, seed=2)
    pruned = prune_channels(base, graph, keep)
    save_pruned(tmp_path, pruned, keep=keep, input_shape=(1, 6, 6), architecture=None)
    with pytest.raises(PruneEnvError, match="base_model="):
        load_pruned(tmp_path)
    fresh = UserNet()  # different random weights: only its architecture is used
    loaded = load_pruned(tmp_path, base_model=fresh)
    x = torch.randn(3, 1, 6, 6)
    assert torch.equal(_outputs(loaded, x), _outputs(pruned, x))
    assert fresh.features[0].out_channels == 12  # the instance passed in is not modified


def test_mismatched_or_missing_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(PruneEnvError, match="no saved pruned model"):
        load_pruned(tmp_path / "absent")
    base = get_model("tiny", num_classes=3, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, 1, 8, 8))
    keep = _random_keep(graph, seed=0)
    save_pruned(tmp_path, prune_channels(base, graph, keep), keep=keep, input_shape=(1, 8, 8),
                architecture="tiny", num_classes=3, in_channels=1)  # fmt: skip
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    first = next(iter(spec["keep"]))
    spec["keep"][first] = spec["keep"][first][:-1]  # one unit fewer than the weights have
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(PruneEnvError, match="do not fit"):
        load_pruned(tmp_path)


def test_trained_problem_model_round_trip(
    tmp_path: Path, digits: Splits, digits_base: tuple[nn.Module, dict[str, float]]
) -> None:
    """The path the CLI takes: a problem's pruned model, saved by group name, reloads with identical outputs."""
    problem = PruningProblem(digits_base[0], digits, target_macs=0.5, eval_samples=64, progress=False)
    keep = problem.uniform_keep()
    pruned = problem.build(keep).eval()
    save_pruned(tmp_path, pruned, keep=kept_units(problem.rankings, keep, problem.group_names),
                input_shape=digits.input_shape, architecture="resnet20", num_classes=digits.num_classes,
                in_channels=digits.in_channels)  # fmt: skip
    loaded = load_pruned(tmp_path)
    x = digits.test.tensors[0][:64]
    assert torch.equal(_outputs(loaded, x), _outputs(pruned, x))
    assert prune_env.count_macs(loaded, x[:1]) == problem.graph.costs.macs(keep)
