"""The engine's boundary: a graph must belong to the model it is used with, and bad ratios, unit indices
and settings raise typed errors naming the problem and the fix instead of doing something else."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import prune_env
import prune_env.surgery
from prune_env import InvalidRatiosError, PruneEnvError, UnknownNameError
from prune_env.errors import InvalidSettingError
from prune_env.importance import MagnitudeImportance, bn_scale_importance, l1_importance, l2_importance


class Net(nn.Module):
    """Two groups: ``a`` (8 units, with a BatchNorm) and ``b`` (4 units)."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b(torch.relu(self.bn(self.a(x)))))
        return self.fc(y.mean((2, 3)))


X = torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module")
def setup() -> tuple[Net, prune_env.DependencyGraph]:
    model = Net().eval()
    graph = prune_env.build_graph(model, X)
    assert [(g.name, g.units) for g in graph.groups] == [("a", 8), ("b", 4)]
    return model, graph


# --------------------------------------------------------------------------------------------------------
# A graph belongs to one architecture
# --------------------------------------------------------------------------------------------------------

FOREIGN = {
    "narrower": lambda: Net(width=6),
    "other head": lambda: Net(classes=3),
    "extra layer": lambda: nn.Sequential(Net()),
}

PUBLIC: dict[str, Callable[[nn.Module, prune_env.DependencyGraph], Any]] = {
    "prune": lambda m, g: prune_env.prune(m, X, 0.5, graph=g),
    "prune_channels": lambda m, g: prune_env.prune_channels(m, g, {"a": [0, 1]}),
    "zero_units": lambda m, g: prune_env.surgery.zero_units(m, g, {"a": [0]}),
    "ModelRebuilder": lambda m, g: prune_env.surgery.ModelRebuilder(m, g).rebuild({"a": [0, 1]}),
    "check_model": lambda m, g: g.check_model(m),
}


@pytest.mark.parametrize("foreign", FOREIGN)
@pytest.mark.parametrize("function", PUBLIC)
def test_a_graph_of_another_model_is_rejected_by_every_public_function(
    setup: tuple[Net, prune_env.DependencyGraph], function: str, foreign: str
) -> None:
    _, graph = setup
    other = FOREIGN[foreign]().eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(InvalidSettingError, match=r"different model.*build the graph from this model"):
        PUBLIC[function](other, graph)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # nothing zeroed


@pytest.mark.parametrize(
    "score", [l1_importance, l2_importance, bn_scale_importance, MagnitudeImportance(power=1)]
)
def test_importance_of_a_foreign_group_is_a_typed_error(
    setup: tuple[Net, prune_env.DependencyGraph], score: Callable
) -> None:
    _, graph = setup
    with pytest.raises(InvalidSettingError, match=r"different model.*build_graph\(model, x\)"):
        score(graph.group("a"), Net(width=6))
    with pytest.raises(InvalidSettingError, match=r"no '(a|bn)'.*build_graph\(model, x\)"):
        score(graph.group("a"), nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_the_check_is_structural_so_copies_and_conversions_pass(
    setup: tuple[Net, prune_env.DependencyGraph],
) -> None:
    model, graph = setup
    twin = Net().eval()  # same architecture, other weights
    for candidate in (model, copy.deepcopy(model), twin, copy.deepcopy(model).double()):
        graph.check_model(candidate)
        prune_env.surgery.ModelRebuilder(candidate, graph)
    pruned = prune_env.prune(twin, X, 0.5, graph=graph)
    assert prune_env.count_macs(pruned, X) == graph.macs(0.5)
    with pytest.raises(
        InvalidSettingError, match=r"module 'a' is Conv2d\(groups=1, weight \(6, 3, 3, 3\)"
    ) as info:
        graph.check_model(Net(width=6), "prune")
    assert str(info.value).startswith("prune: ")  # names the function it was passed to
    grouped = Net()
    grouped.b = nn.Conv2d(8, 4, 3, padding=1, groups=1)
    graph.check_model(grouped)
    grouped.b = nn.Conv2d(16, 4, 3, padding=1, groups=2)  # same weight shape, other channel structure
    with pytest.raises(InvalidSettingError, match="groups=2"):
        graph.check_model(grouped)


def test_not_a_graph_or_not_a_module(setup: tuple[Net, prune_env.DependencyGraph]) -> None:
    model, graph = setup
    with pytest.raises(InvalidSettingError, match="graph must be a DependencyGraph"):
        prune_env.prune_channels(model, model, {"a": [0]})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"zero_units: model must be a torch\.nn\.Module"):
        prune_env.surgery.zero_units(model.state_dict(), graph, {"a": [0]})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# Ratios
# --------------------------------------------------------------------------------------------------------

BAD_RATIOS = {
    "bool": (True, "booleans|real numbers"),
    "numpy bool": (np.bool_(True), "booleans|real numbers"),
    "bool array": (np.array([True, False]), "booleans"),
    "bool in a list": ([0.5, True], "booleans"),
    "bool in a mapping": ({"a": False}, "booleans"),
    "complex": (0.5j, "complex"),
    "complex with zero imaginary part": (np.array([0.5 + 0j, 0.5]), "complex"),
    "complex in a list": ([0.5, 0.25j], "complex"),
    "complex in a mapping": ({"b": 0.5 + 0j}, "complex"),
    "string": ("0.5", "strings"),
    "string in a list": ([0.5, "0.5"], "strings"),
    "None": (None, "real numbers"),
    "ragged": ([0.5, [0.5, 0.5]], "real numbers"),
    "sequence in a mapping": ({"a": [0.5, 0.5]}, "one number"),
    "too many": ([0.1, 0.2, 0.3], "expected 2 ratios"),
    "out of range": (1.5, r"\[0, 1\]"),
    "negative": ([-0.1, 0.0], r"\[0, 1\]"),
    "nan": ([float("nan"), 0.1], "finite"),
    "unknown name": ({"nope": 0.1}, "unknown group name"),
}


@pytest.mark.parametrize("case", BAD_RATIOS)
def test_bad_ratios_are_typed_errors(setup: tuple[Net, prune_env.DependencyGraph], case: str) -> None:
    model, graph = setup
    ratios, message = BAD_RATIOS[case]
    with pytest.raises(InvalidRatiosError, match=message):
        graph.macs(ratios)
    with pytest.raises(InvalidRatiosError, match=message):
        prune_env.prune(model, X, ratios, graph=graph)


def test_integer_ratios_and_numpy_scalars_still_work(setup: tuple[Net, prune_env.DependencyGraph]) -> None:
    _, graph = setup
    assert graph.keep_counts(1).tolist() == [1, 1] and graph.keep_counts(0).tolist() == [8, 4]
    assert graph.keep_counts(np.float32(0.5)).tolist() == [4, 2]
    assert graph.keep_counts(np.array([0.5, 0])).tolist() == [4, 4]
    assert graph.keep_counts({"a": np.float64(0.25)}).tolist() == [6, 4]


# --------------------------------------------------------------------------------------------------------
# Unit indices
# --------------------------------------------------------------------------------------------------------

BAD_UNITS = {
    "float indices": ({"a": [0.0, 1.7]}, r"group 'a' must be integers, got float64"),
    "integer-valued floats": ({"a": np.array([0.0, 1.0])}, "must be integers"),
    "bool mask": ({"a": np.ones(8, dtype=bool)}, r"booleans.*np\.flatnonzero"),
    "bools in a list": ({"a": [True, False]}, "booleans"),
    "negative": ({"a": [0, -1]}, r"group 'a' has 8 units \(valid indices 0 to 7\); got index -1"),
    "too large": ({"b": [4]}, r"group 'b' has 4 units \(valid indices 0 to 3\); got index 4"),
    "duplicate": ({"a": [2, 3, 2]}, r"group 'a': unit index 2 is given more than once"),
    "nested": ({"a": [[0, 1]]}, "flat list"),
    "strings": ({"a": ["0"]}, "must be integers"),
    "unknown group": ({"nope": [0]}, "unknown group name 'nope'"),
    "group index out of range": ({2: [0]}, r"group index 2 out of range.*0 to 1"),
    "bool group key": ({True: [0]}, "name \\(str\\) or index \\(int\\)"),
    "float group key": ({1.0: [0]}, "name \\(str\\) or index \\(int\\)"),
    "a group twice": ({"a": [0], 0: [1]}, "given twice"),
    "wrong number of lists": ([[0]], "expected 2 unit lists"),
    "not a collection": (3, "mapping from group name"),
}
KEEP_ONLY = {
    "empty keep list": ({"a": []}, "must keep at least one unit"),
    "empty array in a list per group": ([np.array([], dtype=np.int64), np.arange(4)], "at least one unit"),
    "float array in a list per group": ([np.array([0.0, 1.7]), np.arange(4)], "must be integers"),
    "negative in a list per group": ([np.array([-1, 0]), np.arange(4)], "got index -1"),
    "duplicate in a list per group": ([np.array([1, 1]), np.arange(4)], "more than once"),
}


@pytest.mark.parametrize("case", [*BAD_UNITS, *KEEP_ONLY])
def test_bad_unit_indices_are_typed_errors(setup: tuple[Net, prune_env.DependencyGraph], case: str) -> None:
    model, graph = setup
    spec, message = {**BAD_UNITS, **KEEP_ONLY}[case]
    with pytest.raises(InvalidRatiosError, match=message):
        prune_env.prune_channels(model, graph, spec)
    rebuilder = prune_env.surgery.ModelRebuilder(model, graph)
    with pytest.raises(InvalidRatiosError, match=message):
        rebuilder.rebuild(spec)
    if case in BAD_UNITS:  # zeroing no unit of a group is fine; the rest is as wrong there
        zeroed = copy.deepcopy(model)
        with pytest.raises(InvalidRatiosError, match=message):
            prune_env.surgery.zero_units(zeroed, graph, spec)


def test_integer_indices_of_any_integer_type_are_accepted(
    setup: tuple[Net, prune_env.DependencyGraph],
) -> None:
    model, graph = setup
    reference = prune_env.prune_channels(model, graph, {"a": [1, 5], "b": [0, 3]})
    for spec in (
        {"a": np.array([5, 1], dtype=np.int32), 1: np.array([0, 3], dtype=np.uint8)},
        {np.int64(0): (1, 5), "b": torch.tensor([3, 0])},
        [[1, 5], np.array([0, 3])],
    ):
        pruned = prune_env.prune_channels(model, graph, spec)
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in pruned.state_dict().items())
        rebuilt = prune_env.surgery.ModelRebuilder(model, graph).rebuild(spec)
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in rebuilt.state_dict().items())


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("round_to", [0, -8, 2.5, True, "8", None])
def test_round_to_must_be_a_positive_integer(
    setup: tuple[Net, prune_env.DependencyGraph], round_to: Any
) -> None:
    model, graph = setup
    with pytest.raises(InvalidSettingError, match=r"round_to must be a positive integer.*round_to=8"):
        prune_env.prune(model, X, 0.5, graph=graph, round_to=round_to)
    with pytest.raises(InvalidSettingError, match="round_to"):
        graph.macs(0.5, round_to=round_to)
    assert graph.keep_counts(0.5, round_to=np.int64(2)).tolist() == [4, 2]


def test_importance_must_be_a_known_name_or_a_callable(setup: tuple[Net, prune_env.DependencyGraph]) -> None:
    model, graph = setup
    with pytest.raises(UnknownNameError, match="unknown importance 'taylr'"):
        prune_env.prune(model, X, 0.5, graph=graph, importance="taylr")
    with pytest.raises(InvalidSettingError, match="computed from training data: pass batches="):
        prune_env.prune(model, X, 0.5, graph=graph, importance="taylor")
    with pytest.raises(InvalidSettingError, match="importance must be a name"):
        prune_env.prune(model, X, 0.5, graph=graph, importance=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match="not real numbers"):
        prune_env.prune(model, X, 0.5, graph=graph, importance=lambda g, m: ["x"] * g.units)
    with pytest.raises(InvalidSettingError, match="expected 8 finite values"):
        prune_env.prune(model, X, 0.5, graph=graph, importance=lambda g, m: np.zeros(3))


BAD_BUILD = {
    "input not a tensor": ({"example_inputs": "abc"}, InvalidSettingError, "tensor or a non-empty tuple"),
    "numpy input": ({"example_inputs": X.numpy()}, InvalidSettingError, r"torch\.from_numpy"),
    "no inputs": ({"example_inputs": ()}, InvalidSettingError, "non-empty"),
    "a non-tensor in the inputs": ({"example_inputs": (X, 1.0)}, InvalidSettingError, r"example_inputs\[1\]"),
    "wrong channel count": ({"example_inputs": torch.randn(1, 5, 8, 8)}, InvalidSettingError, "cannot run"),
    "wrong dtype": ({"example_inputs": X.long()}, InvalidSettingError, r"cannot run.*torch\.int64"),
    "one leaf type, not a list": ({"leaf_modules": nn.Conv2d}, InvalidSettingError, r"leaf_modules=\["),
    "a leaf that is not a module": ({"leaf_modules": [3]}, InvalidSettingError, "nn.Module subclasses"),
    "not a module": ({"model": lambda x: x}, TypeError, r"build_graph: model must be a torch\.nn\.Module"),
}


@pytest.mark.parametrize("case", BAD_BUILD)
def test_bad_build_graph_arguments(case: str) -> None:
    changes, error, message = BAD_BUILD[case]
    arguments = {"model": Net().eval(), "example_inputs": X, **changes}
    leaf = {"leaf_modules": arguments.pop("leaf_modules")} if "leaf_modules" in arguments else {}
    with pytest.raises(error, match=message) as info:
        prune_env.build_graph(arguments["model"], arguments["example_inputs"], **leaf)
    assert isinstance(info.value, PruneEnvError) or error is TypeError
