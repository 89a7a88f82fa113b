"""The engine's arguments and quantization files, refused at the boundary in one typed line naming the
problem and the fix: bit plans (layers the model does not have, bits out of range, malformed JSON), saved
activation ranges (inverted, non-finite, malformed), ``leaf_modules`` names that match nothing, ratio arrays
that are not flat, and a ``round_to`` too coarse for ``max_ratio``."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_output import one_error_line
from torch import nn

import prune_env
from prune_env.app import cli
from prune_env.budget import BudgetProjector
from prune_env.errors import CheckpointError, InvalidRatiosError, InvalidSettingError
from prune_env.models import get_model
from prune_env.problem import PruningProblem
from prune_env.quantization import (
    BitPlan,
    bitops,
    count_bitops,
    count_size_bits,
    fake_quantize,
    group_layers,
    load_fake_quantized,
    quantizable_layers,
    save_fake_quantized,
    size_bits,
    to_int8,
)
from prune_env.quantization.budget import JointProjector

X = torch.randn(4, 3, 8, 8)


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, prune_env.DependencyGraph]:
    torch.manual_seed(0)
    model = get_model("tiny", num_classes=10).eval()
    graph = prune_env.build_graph(model, X[:1])
    assert [(g.name, g.units) for g in graph.groups] == [("stem.0", 16), ("conv1.0", 32)]
    return model, graph


# ------------------------------------------------------------------------------------------------ bit plans

BAD_PLANS: dict[str, tuple[Callable[[], Any], str]] = {
    "bits below 2": (lambda: BitPlan({"fc": 1}), "bits in 2..16, or 32"),
    "bits between 16 and 32": (lambda: BitPlan({}, {"fc": 24}), "bits in 2..16, or 32"),
    "float bits": (lambda: BitPlan({"fc": 8.0}), "must be an integer"),
    "bool bits": (lambda: BitPlan({"fc": True}), "must be an integer"),
    "string bits": (lambda: BitPlan({"fc": "8"}), "must be an integer"),
    "an integer layer name": (lambda: BitPlan({0: 8}), r"non-empty strings, '0' for a Sequential"),
    "an empty layer name": (lambda: BitPlan({"": 8}), "non-empty strings"),
    "not a mapping": (lambda: BitPlan([("fc", 8)]), "must map layer names to bits"),  # type: ignore[arg-type]
    "garbage JSON": (lambda: BitPlan.from_json("{weights: 8"), "must be JSON text"),
    "empty JSON": (lambda: BitPlan.from_json(""), "must be JSON text"),
    "not text": (lambda: BitPlan.from_json(None), "must be JSON text"),  # type: ignore[arg-type]
    "a JSON list": (lambda: BitPlan.from_json("[8, 8]"), "must be a JSON object.*got a list"),
    "weights not an object": (lambda: BitPlan.from_json('{"weights": [8]}'), '"weights" must map layer'),
    "NaN bits": (lambda: BitPlan.from_json('{"weights": {"fc": NaN}}'), "must be an integer, got nan"),
    "infinite bits": (lambda: BitPlan.from_json('{"activations": {"fc": Infinity}}'), "must be an integer"),
    "string bits in JSON": (lambda: BitPlan.from_json('{"weights": {"fc": "8"}}'), "must be an integer"),
    "fractional bits in JSON": (lambda: BitPlan.from_json('{"weights": {"fc": 8.5}}'), "must be an integer"),
    "a misspelt entry": (lambda: BitPlan.from_json('{"weight": {"fc": 8}}'), r"got also \['weight'\]"),
}


@pytest.mark.parametrize("case", BAD_PLANS)
def test_malformed_bit_plans_are_refused(case: str) -> None:
    make, message = BAD_PLANS[case]
    with pytest.raises(InvalidSettingError, match=message):
        make()


def test_a_saved_plan_round_trips_through_json() -> None:
    plan = BitPlan({"conv1.0": 4, "fc": 8}, {"conv1.0": 6})
    assert BitPlan.from_json(plan.to_json()) == plan
    assert BitPlan.from_json(json.dumps({**json.loads(plan.to_json()), "activation_ranges": {}})) == plan


# Each function that applies a plan or computes its costs, called on the tiny model.
APPLY: dict[str, Callable[[nn.Module, prune_env.DependencyGraph, BitPlan, Path], Any]] = {
    "bitops": lambda m, g, plan, _: bitops(g.costs, g.costs.full_keep(), plan),
    "size_bits": lambda m, g, plan, _: size_bits(g.costs, g.costs.full_keep(), plan),
    "count_bitops": lambda m, g, plan, _: count_bitops(m, (X[:1],), plan),
    "count_size_bits": lambda m, g, plan, _: count_size_bits(m, plan),
    "fake_quantize": lambda m, g, plan, _: fake_quantize(copy.deepcopy(m), plan, [X]),
    "to_int8": lambda m, g, plan, _: to_int8(m, plan, [X], (X[:1],)),
    "save_fake_quantized": lambda m, g, plan, out: save_fake_quantized(m, plan, [X], out / "q"),
}
FOREIGN_PLANS = {
    "a misspelt layer": (
        BitPlan({"conv1.O": 8}),
        r"does not have: \['conv1\.O'\]; did you mean [^?]*'conv1\.0'",
    ),
    "an unknown activation layer": (BitPlan({}, {"head": 8}), r"does not have: \['head'\]"),
}


@pytest.mark.parametrize("plan", FOREIGN_PLANS)
@pytest.mark.parametrize("function", APPLY)
def test_a_plan_naming_layers_the_model_does_not_have_is_refused_everywhere(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], function: str, plan: str, tmp_path: Path
) -> None:
    model, graph = tiny
    bits, message = FOREIGN_PLANS[plan]
    with pytest.raises(InvalidSettingError, match=message):
        APPLY[function](model, graph, bits, tmp_path)
    assert not (tmp_path / "q").exists()  # nothing written


@pytest.mark.parametrize("function", ["count_bitops", "count_size_bits", "fake_quantize", "to_int8"])
def test_a_plan_quantizing_a_norm_layer_is_refused(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], function: str, tmp_path: Path
) -> None:
    model, graph = tiny
    with pytest.raises(
        InvalidSettingError, match=r"'stem\.1' is a BatchNorm2d; only convolutions and linear"
    ):
        APPLY[function](model, graph, BitPlan({"stem.1": 8}), tmp_path)


def test_plans_naming_the_models_layers_still_cost_and_apply(
    tiny: tuple[nn.Module, prune_env.DependencyGraph],
) -> None:
    model, graph = tiny
    plan = BitPlan.uniform(quantizable_layers(model), 8)
    assert bitops(graph.costs, graph.costs.full_keep(), plan) == count_bitops(model, (X[:1],), plan)
    assert size_bits(graph.costs, graph.costs.full_keep(), plan) == count_size_bits(model, plan)
    fake_quantize(copy.deepcopy(model), plan, [X])


@pytest.mark.parametrize(
    "bits", [np.full((1, 2), 8), [[8, 8]], [8, [8]]], ids=["(1, 2) array", "nested list", "ragged"]
)
def test_joint_bits_must_be_one_flat_width_per_group(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], bits: Any
) -> None:
    model, graph = tiny
    projector = JointProjector(
        graph.costs, [g.units for g in graph.groups], group_layers(graph, model), quantizable_layers(model)
    )
    with pytest.raises(InvalidSettingError, match="weight_bits must be a flat sequence"):
        projector.cost_ratio(graph.costs.full_keep(), bits, [8, 8])
    assert projector.cost_ratio(graph.costs.full_keep(), np.array([8, 8]), (8, 8)) < 1


# -------------------------------------------------------------------- saved fake-quantized models and ranges


@pytest.fixture(scope="module")
def saved(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    model, _ = tiny
    layers = quantizable_layers(model)
    return save_fake_quantized(model, BitPlan.uniform(layers, 4, 6), [X], tmp_path_factory.mktemp("fq") / "q")


def _with_ranges(document: dict[str, Any], layer: str, value: Any) -> dict[str, Any]:
    return {**document, "activation_ranges": {**document["activation_ranges"], layer: value}}


# (how bit_plan.json is changed: a function of the saved document, or text replacing it; the message)
BAD_FILES: dict[str, tuple[Callable[[dict[str, Any]], Any] | str, str]] = {
    "inverted range": (
        lambda d: _with_ranges(d, "fc", [2.0, -1.0]),
        r"\[2, -1\], is inverted \(low > high\)",
    ),
    "NaN range": (
        lambda d: _with_ranges(d, "fc", [float("nan"), 1.0]),
        r"not valid JSON \(NaN is not a JSON",
    ),
    "infinite range": (
        lambda d: _with_ranges(d, "fc", [0.0, float("inf")]),
        r"not valid JSON \(Infinity is not a JSON",
    ),
    "three numbers": (lambda d: _with_ranges(d, "fc", [0.0, 1.0, 2.0]), r"two numbers \[low, high\]"),
    "strings": (lambda d: _with_ranges(d, "fc", ["0", "1"]), r"two numbers \[low, high\]"),
    "booleans": (lambda d: _with_ranges(d, "fc", [False, True]), r"two numbers \[low, high\]"),
    "a number": (lambda d: _with_ranges(d, "fc", 1.0), r"two numbers \[low, high\]"),
    "a range for an unquantized layer": (
        lambda d: _with_ranges(d, "stem.1", [0.0, 1.0]),
        r"range for 'stem\.1', whose inputs the plan does not quantize",
    ),
    "ranges not an object": (lambda d: {**d, "activation_ranges": [[0, 1]]}, "must map layer names"),
    "an unknown layer": (
        lambda d: {**d, "weights": {**d["weights"], "conv9": 4}},
        r"does not have: \['conv9'\]",
    ),
    "bits out of range": (lambda d: {**d, "weights": {**d["weights"], "fc": 99}}, "bits in 2..16, or 32"),
    "not an object": (lambda d: [d], "must be a JSON object"),
    "garbage": ("{'weights':", "is not valid JSON"),
    "empty": ("", "is not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_damaged_bit_plan_file_is_refused_before_the_model_is_touched(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], saved: Path, tmp_path: Path, case: str
) -> None:
    model, _ = tiny
    change, message = BAD_FILES[case]
    copied = tmp_path / "q"
    copied.mkdir()
    (copied / "model.pt").write_bytes((saved / "model.pt").read_bytes())
    document = json.loads((saved / "bit_plan.json").read_text())
    text = change if isinstance(change, str) else json.dumps(change(document))
    (copied / "bit_plan.json").write_text(text)
    target = copy.deepcopy(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as info:
        load_fake_quantized(target, copied)
    assert "bit_plan.json" in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_pre_hooks for m in target.modules())  # no quantizer installed


def test_missing_or_foreign_files_of_a_fake_quantized_model_are_refused(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], saved: Path, tmp_path: Path
) -> None:
    model, _ = tiny
    with pytest.raises(CheckpointError, match=r"bit_plan\.json is missing"):
        load_fake_quantized(copy.deepcopy(model), tmp_path)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "bit_plan.json").write_text((saved / "bit_plan.json").read_text())
    (damaged / "model.pt").write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_fake_quantized(copy.deepcopy(model), damaged)
    wider = get_model("tiny", num_classes=12).eval()  # same layer names, another classifier
    with pytest.raises(CheckpointError, match=r"do not fit this model \('fc\.(weight|bias)'"):
        load_fake_quantized(wider, saved)
    reloaded, plan = load_fake_quantized(copy.deepcopy(model), saved)
    assert plan == BitPlan.uniform(quantizable_layers(model), 4, 6)
    torch.testing.assert_close(reloaded(X), fake_quantize(copy.deepcopy(model), plan, [X])(X), rtol=0, atol=0)


def test_non_finite_calibration_inputs_are_refused(tiny: tuple[nn.Module, prune_env.DependencyGraph]) -> None:
    model, _ = tiny
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidSettingError, match=r"inputs of layer 'stem\.0' reach NaN or inf"):
        fake_quantize(copy.deepcopy(model), BitPlan({}, {"stem.0": 8}), [bad])


# ------------------------------------------------------------------------------------------------ leaf_modules

BAD_LEAVES = {
    "a misspelt name": (
        ["conv1.O"],
        r"'conv1\.O' matches no module of TinyCNN; did you mean [^?]*'conv1\.0'",
    ),
    "a name far from any": (["backbone.block7"], r"'backbone\.block7' matches no module.*named_modules\(\)"),
    "the model itself": ([""], "'' matches no module"),
    "a module instance": ([nn.Conv2d(3, 3, 1)], "nn.Module subclasses or qualified module names"),
    "a type that is not a module": ([int], "nn.Module subclasses"),
}


@pytest.mark.parametrize("case", BAD_LEAVES)
def test_leaf_modules_must_name_modules_of_the_model(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], case: str
) -> None:
    model, _ = tiny
    leaves, message = BAD_LEAVES[case]
    with pytest.raises(InvalidSettingError, match=message):
        prune_env.build_graph(model, X[:1], leaf_modules=leaves)


def test_leaf_modules_that_exist_freeze_their_channels(
    tiny: tuple[nn.Module, prune_env.DependencyGraph],
) -> None:
    model, _ = tiny
    with pytest.warns(UserWarning, match="conv2: Sequential module 'conv2'"):
        graph = prune_env.build_graph(model, X[:1], leaf_modules=["conv2", nn.BatchNorm1d])
    assert [g.name for g in graph.groups] == ["stem.0"]  # conv1.0 feeds the black box


# ------------------------------------------------------------------------------------------------ ratios

BAD_RATIOS = {
    "a (1, 2) array": (np.full((1, 2), 0.5), r"expected 2 ratios \(a flat sequence.*ratios\.reshape\(-1\)"),
    "a (2, 1) array": (np.full((2, 1), 0.5), r"got shape \(2, 1\)"),
    "a (2, 2) array": (np.full((2, 2), 0.5), r"got shape \(2, 2\)"),
    "a nested list": ([[0.5, 0.5]], r"got shape \(1, 2\)"),
    "a 2-D tensor": (torch.full((1, 2), 0.5), r"got shape \(1, 2\)"),
    "too few": ([0.5], r"expected 2 ratios"),
    "above 1": ([0.5, 1.5], r"\[0, 1\]"),
    "NaN": ([0.5, float("nan")], "finite"),
    "an unknown group": ({"stem.O": 0.5}, "unknown group name"),
}


@pytest.mark.parametrize("case", BAD_RATIOS)
def test_prune_refuses_ratios_that_are_not_one_per_group(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], case: str
) -> None:
    model, graph = tiny
    ratios, message = BAD_RATIOS[case]
    with pytest.raises(InvalidRatiosError, match=message):
        prune_env.prune(model, X[:1], ratios, graph=graph)
    with pytest.raises(InvalidRatiosError, match=message):
        prune_env.prune(model, X[:1], ratios)  # before the graph is built for it


def test_a_zero_dimensional_ratio_is_one_ratio_for_every_group(
    tiny: tuple[nn.Module, prune_env.DependencyGraph],
) -> None:
    _, graph = tiny
    assert graph.keep_counts(np.array(0.5)).tolist() == graph.keep_counts(0.5).tolist() == [8, 16]
    assert graph.keep_counts(torch.tensor(0.25)).tolist() == [12, 24]


# ------------------------------------------------------------------------------------------------ round_to

# (max_ratio, round_to, message or None when accepted) for the tiny model's groups of 16 and 32 channels.
ROUNDING = {
    "one multiple too many for the 16": (
        0.9,
        4,
        r"round_to=4 and max_ratio=0.9 cannot both hold for 'stem\.0' \(16 channels\):.*1 channel; use "
        r"max_ratio=0\.75 or lower, or round_to=3 or lower",
    ),
    "round_to above both groups": (
        0.8,
        32,
        r"'stem\.0' \(16 channels\), 'conv1\.0' \(32 channels\).*use round_to=6 or lower",
    ),
    "round_to larger than a group": (0.5, 20, r"'stem\.0' \(16 channels\).*round_to=15 or lower"),
    "nearest multiple": (0.5, 8, None),
    "rounding to one channel is what max_ratio allows": (0.95, 2, None),
    "no rounding": (0.99, 1, None),
}


@pytest.mark.parametrize("case", ROUNDING)
def test_round_to_too_coarse_for_max_ratio_is_refused_naming_the_groups(
    tiny: tuple[nn.Module, prune_env.DependencyGraph], case: str
) -> None:
    model, graph = tiny
    max_ratio, round_to, message = ROUNDING[case]
    units = [g.units for g in graph.groups]
    names = [g.name for g in graph.groups]

    def projector() -> BudgetProjector:
        return BudgetProjector(graph.costs, units, max_ratio=max_ratio, round_to=round_to, names=names)

    def joint() -> JointProjector:
        layers = group_layers(graph, model)
        return JointProjector(
            graph.costs, units, layers, quantizable_layers(model), max_ratio=max_ratio, round_to=round_to
        )

    if message is None:
        keep = projector().min_keep
        assert np.all(keep >= np.floor(np.array(units) * (1 - max_ratio)))  # max_ratio holds
        joint()
        return
    with pytest.raises(InvalidSettingError, match=message):
        projector()
    with pytest.raises(InvalidSettingError, match=r"cannot both hold for group 0 \(16 channels\)"):
        joint()


@pytest.fixture(scope="module")
def problem(untrained_resnet20: nn.Module, digits: Any) -> PruningProblem:
    return PruningProblem(untrained_resnet20, digits, target_macs=0.5, eval_samples=32, bn_recalib_batches=1)


def test_a_problem_refuses_a_round_to_too_coarse_for_its_max_ratio(
    untrained_resnet20: nn.Module, digits: Any
) -> None:
    with pytest.raises(InvalidSettingError, match=r"round_to=64 and max_ratio=0\.8 cannot both hold for '"):
        PruningProblem(untrained_resnet20, digits, round_to=64, progress=False)


def test_keep_for_refuses_ratio_arrays_that_are_not_flat(problem: PruningProblem) -> None:
    with pytest.raises(InvalidRatiosError, match=r"got shape \(1, "):
        problem.keep_for(np.zeros((1, problem.n_groups)))
    assert problem.keep_for(np.zeros(problem.n_groups)).shape == (problem.n_groups,)


def test_search_refuses_a_round_to_too_coarse_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["search", "--agent", "random", "--no-progress", "--out", str(out), "--round-to", "64"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "round_to=64 and max_ratio=0.8 cannot both hold for" in line and "round_to=" in line
    assert not out.exists()
