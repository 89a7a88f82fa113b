"""Hostile inputs to the library's own functions: a ``round_to`` coarser than the groups, budgets that are
not fractions, a dataset whose samples change shape after the first, bit plans and saved fake-quantized
models that were edited or raced over, bit widths without a level, and Ray addresses where something other
than Ray answers. Each is refused with a typed one-line error naming what is wrong, in bounded time."""

from __future__ import annotations

import copy
import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import prune_env
from prune_env.batches import iterate_batches, take
from prune_env.data import Splits
from prune_env.errors import CheckpointError, DatasetError, InvalidSettingError, PruneEnvError
from prune_env.models import get_model
from prune_env.problem import PruningProblem
from prune_env.quantization import BitPlan, fake_quantize, quantize_weight
from prune_env.quantization import export as quant_export
from prune_env.quantization.bits import quantizable_layers
from prune_env.quantization.export import load_fake_quantized, save_fake_quantized
from prune_env.user_data import from_datasets

# ------------------------------------------------------------------------------------------------ round_to


def widening_net() -> nn.Sequential:
    """Three conv groups of 16, 32 and 64 channels, then a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def widening() -> tuple[nn.Module, torch.Tensor, prune_env.DependencyGraph]:
    torch.manual_seed(0)
    model = widening_net().eval()
    x = torch.randn(1, 3, 8, 8)
    return model, x, prune_env.build_graph(model, x)


# ratios, round_to -> the refusal's message, or None when pruned as graph.macs predicts.
ROUND_TO: dict[str, tuple[Any, int, str | None]] = {
    "round_to above every group": (
        0.5,
        64,
        r"round_to=64 would leave '0' \(16 channels, ratio 0\.5 keeps 8\), '2' \(32 channels, ratio 0\.5 "
        r"keeps 16\), '4' \(64 channels, ratio 0\.5 keeps 32\) 1 channel.*use round_to=15 or lower",
    ),
    "round_to above the smallest group": (0.5, 20, r"'0' \(16 channels.*use round_to=15 or lower"),
    "only the pruned group counts": ({"2": 0.5}, 64, r"'2' \(32 channels.*use round_to=31 or lower"),
    "a nearby multiple": (0.5, 8, None),
    "no rounding": (0.5, 1, None),
    "an unpruned group whatever the multiple": ({"4": 0.5}, 32, None),
    # One channel where 1.6 were asked for is rounding, not a collapse: what max_ratio-style limits allow.
    "rounding to one channel of a nearly emptied group": (0.9, 4, None),
}


@pytest.mark.parametrize("case", ROUND_TO)
def test_round_to_never_silently_empties_a_group(
    widening: tuple[nn.Module, torch.Tensor, prune_env.DependencyGraph], case: str
) -> None:
    model, x, graph = widening
    ratios, round_to, message = ROUND_TO[case]
    if message is not None:
        with pytest.raises(InvalidSettingError, match=message) as info:
            prune_env.prune(model, x, ratios, graph=graph, round_to=round_to)
        assert "\n" not in str(info.value)
        return
    pruned = prune_env.prune(model, x, ratios, graph=graph, round_to=round_to)
    assert prune_env.count_macs(pruned, x) == graph.macs(ratios, round_to)
    keep = graph.keep_counts(ratios, round_to)
    units = np.array([g.units for g in graph.groups])
    assert np.all((keep % round_to == 0) | (keep == units) | (keep == 1))


def test_the_suggested_round_to_works_and_keeps_the_asked_macs(
    widening: tuple[nn.Module, torch.Tensor, prune_env.DependencyGraph],
) -> None:
    model, x, graph = widening
    with pytest.raises(InvalidSettingError, match=r"use round_to=15 or lower"):
        prune_env.prune(model, x, 0.5, graph=graph, round_to=64)
    pruned = prune_env.prune(model, x, 0.5, graph=graph, round_to=15)
    ratio = prune_env.count_macs(pruned, x) / graph.base_macs
    unrounded = prune_env.count_macs(prune_env.prune(model, x, 0.5, graph=graph), x) / graph.base_macs
    assert ratio == pytest.approx(unrounded, abs=0.15)  # was 0.002: one channel left per group
    assert [pruned[i].out_channels for i in (0, 2, 4)] == [15, 15, 30]


# ------------------------------------------------------------------------------------------------ targets


@pytest.fixture(scope="module")
def problem(digits: Splits) -> PruningProblem:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_model("tiny", digits.num_classes, digits.in_channels).eval()
    return PruningProblem(model, digits, eval_samples=32, bn_recalib_batches=1, progress=False)


BAD_TARGETS: dict[str, tuple[Any, str]] = {
    "above one": (5.0, r"target must be a fraction in \(0, 1\]"),
    "just above one": (1.0000001, r"target must be a fraction in \(0, 1\]"),
    "zero": (0.0, r"target must be a fraction in \(0, 1\]"),
    "negative": (-0.5, r"target must be a fraction in \(0, 1\]"),
    "NaN": (float("nan"), "target must be a finite number"),
    "infinite": (float("inf"), "target must be a finite number"),
    "a bool": (True, "target must be a real number"),
    "a string": ("0.5", "target must be a real number"),
    "an array": (np.array([0.5]), "target must be a real number"),
    "unreachable": (1e-9, "is impossible"),
}


@pytest.mark.parametrize("case", BAD_TARGETS)
def test_a_target_is_a_reachable_fraction_everywhere_a_problem_takes_one(
    problem: PruningProblem, case: str
) -> None:
    target, message = BAD_TARGETS[case]
    full = problem.units.copy()
    calls = {
        "keep_for": lambda: problem.keep_for(np.zeros(problem.n_groups), target=target),
        "uniform_keep": lambda: problem.uniform_keep(target),
        "evaluate": lambda: problem.evaluate(np.zeros(problem.n_groups), target),
        "evaluate_keep": lambda: problem.evaluate_keep(full, target),
        "outcome": lambda: problem.outcome(full, accuracy=0.5, loss=1.0, target=target),
    }
    evaluations = problem.evaluations
    for name, call in calls.items():
        with pytest.raises(InvalidSettingError, match=message) as info:
            call()
        assert "\n" not in str(info.value), name
    assert problem.evaluations == evaluations  # refused before any proxy evaluation


def test_a_valid_target_is_met_and_numpy_fractions_are_accepted(problem: PruningProblem) -> None:
    for target in (0.5, np.float32(0.5), 1, np.float64(0.75)):
        keep = problem.keep_for(np.zeros(problem.n_groups), target=target)
        assert problem.graph.costs.macs(keep) <= float(target) * problem.graph.base_macs
    assert problem.outcome(problem.units, accuracy=0.5, loss=1.0, target=np.float64(0.25)).target == 0.25
    assert problem.outcome(problem.units, accuracy=0.5, loss=1.0).target == problem.target


# ------------------------------------------------------------------------------------------------ datasets


class MixedShapes(Dataset[Any]):
    """A torchvision-style dataset (``targets`` list) whose first sample is 1x8x8 and the others
    ``later``; only the first sample is read up front."""

    def __init__(self, n: int = 40, later: tuple[int, ...] = (1, 12, 12), bad_from: int = 1) -> None:
        self.targets = [i % 2 for i in range(n)]
        self.later, self.bad_from = later, bad_from
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads.append(index)
        shape = (1, 8, 8) if index < self.bad_from else self.later
        return torch.full(shape, float(index)), self.targets[index]


SHAPE_READS = {
    "take (proxy batches)": lambda split: take(split, list(range(len(split)))),
    "iterate_batches (a DataLoader)": lambda split: list(iterate_batches(split, 8)),
}


@pytest.mark.parametrize("read", SHAPE_READS)
def test_a_sample_of_another_shape_is_named_when_read(read: str) -> None:
    data = MixedShapes()
    splits = from_datasets(data, None, seed=0)
    assert data.reads == [0]  # only the first sample is read up front
    for split in (splits.train, splits.val, splits.test):
        with pytest.raises(DatasetError) as info:
            SHAPE_READS[read](split)
        message = str(info.value)
        index = int(message.split("sample ")[1].split(" ")[0])
        assert index >= 1 and "(1, 12, 12) but sample 0 has (1, 8, 8)" in message, message
        assert "\n" not in message and "stack expects" not in message


def test_a_problem_on_a_dataset_whose_later_samples_change_shape_is_refused_with_the_sample() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )
    with pytest.raises(
        DatasetError, match=r"the training data's sample \d+ has the input shape \(1, 12, 12\) "
    ):
        PruningProblem(model, MixedShapes(), eval_samples=8, bn_recalib_batches=1, progress=False)


def test_samples_of_one_shape_pass_the_read_check_and_the_wrapper_pickles() -> None:
    data = MixedShapes(later=(1, 8, 8))
    splits = from_datasets(data, None, seed=0)
    x, y = take(splits.val, list(range(len(splits.val))))
    assert x.shape[1:] == (1, 8, 8) and len(y) == len(splits.val)
    assert splits.name == "custom:MixedShapes"
    copied = pickle.loads(pickle.dumps(splits.train))  # problems are copied to worker processes
    assert take(copied, [0])[0].shape == (1, 1, 8, 8)
    with pytest.raises(DatasetError, match=r"NaN or inf in the input of sample [1-9]"):
        take(from_datasets(NaNAfterFirst(), None, seed=0).val, [0, 1, 2])


class NaNAfterFirst(MixedShapes):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 8, 8), float("nan") if index else 0.0), self.targets[index]


# ------------------------------------------------------------------------------------------------ quantization

X = torch.randn(4, 3, 8, 8)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_model("tiny", num_classes=10).eval()


DUPLICATED_PLANS = {
    "a layer named twice": '{"weights": {"fc": 8, "fc": 4}}',
    "weights given twice": '{"weights": {"fc": 8}, "activations": {}, "weights": {"fc": 4}}',
    "a nested activation layer named twice": '{"activations": {"fc": 4, "conv1.0": 8, "fc": 6}}',
}


@pytest.mark.parametrize("case", DUPLICATED_PLANS)
def test_a_bit_plan_naming_a_key_twice_is_refused(case: str) -> None:
    with pytest.raises(InvalidSettingError, match=r"name each entry and layer once: key '\w+' appears twice"):
        BitPlan.from_json(DUPLICATED_PLANS[case])
    with pytest.raises(InvalidSettingError, match="appears twice"):
        BitPlan.from_json(DUPLICATED_PLANS[case].encode())


BAD_BITS = [1, 0, -8, 17, 31, 33, True, 8.0, float("nan"), "8", None, np.float64(4.0)]


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
def test_quantize_weight_refuses_widths_outside_the_shared_rule(bits: Any) -> None:
    with pytest.raises(InvalidSettingError, match=r"bits must be (an integer|a number of bits in 2\.\.16)"):
        quantize_weight(torch.randn(4, 3), bits)


@pytest.mark.parametrize("bits", [2, 3, 16, np.int64(4)], ids=repr)
def test_quantize_weight_gives_finite_levels_for_every_accepted_width(bits: Any) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    q = quantize_weight(w, bits)
    levels = 2 ** (int(bits) - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / levels
    assert torch.isfinite(q).all()
    steps = q / scale  # whole numbers of steps, at most ``levels`` of them either way
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= levels + 1e-3
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()


@pytest.fixture(scope="module")
def saved(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = BitPlan.uniform(quantizable_layers(tiny), 4, 6)
    return save_fake_quantized(tiny, plan, [X], tmp_path_factory.mktemp("fq") / "q")


@pytest.mark.parametrize("layer", ["fc", "stem.0"])
def test_a_saved_model_missing_a_layers_activation_range_is_refused(
    tiny: nn.Module, saved: Path, tmp_path: Path, layer: str
) -> None:
    document = json.loads((saved / "bit_plan.json").read_text())
    assert layer in document["activation_ranges"]
    del document["activation_ranges"][layer]
    (tmp_path / "bit_plan.json").write_text(json.dumps(document))
    (tmp_path / "model.pt").write_bytes((saved / "model.pt").read_bytes())
    target = copy.deepcopy(tiny)
    with pytest.raises(
        CheckpointError, match=rf"has no range for '{layer}', whose inputs the plan quantizes to 6"
    ) as info:
        load_fake_quantized(target, tmp_path)
    assert str(tmp_path / "bit_plan.json") in str(info.value) and "\n" not in str(info.value)
    assert not any(m._forward_pre_hooks for m in target.modules())


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)  # never called: the calibration batches never reach it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_layer_the_calibration_never_reaches_is_saved_with_its_range_and_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, batches = WithUnusedLayer().eval(), [torch.randn(8, 4)]
    plan = BitPlan.uniform(["used", "spare"], 4, 6)
    out = save_fake_quantized(model, plan, batches, tmp_path / "q")
    ranges = json.loads((out / "bit_plan.json").read_text())["activation_ranges"]
    assert sorted(ranges) == ["spare", "used"] and ranges["spare"] == [0.0, 0.0]
    reloaded, saved_plan = load_fake_quantized(WithUnusedLayer(), out)
    assert saved_plan == plan
    expected = fake_quantize(copy.deepcopy(model), plan, batches)
    x = torch.randn(5, 4)
    assert torch.equal(reloaded(x), expected(x))
    assert torch.equal(reloaded.spare(x), expected.spare(x))


def test_two_saves_racing_into_one_directory_save_one_and_refuse_the_other(
    tiny: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both saves pass the early existence check and meet at the moment of publishing model.pt.
    barrier = threading.Barrier(2, timeout=30)
    publish = quant_export.write_bytes_atomic

    def together(path: Any, data: bytes, **kwargs: Any) -> None:
        barrier.wait()
        publish(path, data, **kwargs)

    monkeypatch.setattr(quant_export, "write_bytes_atomic", together)
    plans = [BitPlan.uniform(quantizable_layers(tiny), bits, 8) for bits in (4, 6)]
    out = tmp_path / "q"
    results: list[Any] = [None, None]

    def save(i: int) -> None:
        try:
            results[i] = save_fake_quantized(tiny, plans[i], [X], out)
        except Exception as exc:  # what the other thread gets, checked below
            results[i] = exc

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1, results
    assert isinstance(errors[0], InvalidSettingError) and isinstance(errors[0], PruneEnvError)
    assert f"{out} already holds a saved model" in str(errors[0]) and "\n" not in str(errors[0])
    winner = plans[results.index(out)]
    reloaded, plan = load_fake_quantized(copy.deepcopy(tiny), out)
    assert plan == winner  # the plan beside the weights is the winner's, not the refused save's
    assert torch.equal(reloaded(X), fake_quantize(copy.deepcopy(tiny), winner, [X])(X))  # and the weights
    assert sorted(p.name for p in out.iterdir()) == ["bit_plan.json", "model.pt"]  # no temporary left


# ------------------------------------------------------------------------------------------------ Ray


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    from prune_env import optional_ray

    monkeypatch.setattr(optional_ray, "CONNECT_TIMEOUT_S", 2.0)
    return 2.0


def _grpc_server(handler: Any) -> Iterator[int]:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if handler is not None:
        server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@pytest.fixture
def grpc_not_ray() -> Iterator[int]:
    """A loopback gRPC server with no service at all: every method is unknown there."""
    yield from _grpc_server(None)


@pytest.fixture
def grpc_like_a_gcs() -> Iterator[int]:
    """A loopback gRPC server answering the one GCS method Ray calls first, as a Ray head's GCS does."""
    grpc = pytest.importorskip("grpc")

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            if details.method == "/ray.rpc.NodeInfoGcsService/GetClusterId":
                return grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
            return None

    yield from _grpc_server(Handler())


def _refusal(address: str, bound: float) -> str:
    from prune_env import optional_ray

    started = time.monotonic()
    with pytest.raises(InvalidSettingError) as info:
        optional_ray.check_answers(address)
    assert time.monotonic() - started < bound + 1.5  # the probe's bound, plus slack for a loaded machine
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_grpc_service_that_is_not_ray_is_refused_within_the_timeout(
    short_timeout: float, grpc_not_ray: int, scheme: str
) -> None:
    pytest.importorskip("ray", reason="Ray is optional")
    address = f"{scheme}127.0.0.1:{grpc_not_ray}"
    message = _refusal(address, short_timeout)
    assert message.startswith(f"Ray address {address} answers gRPC, but no Ray head or Ray Client server")


def test_the_other_form_of_a_ray_address_is_named(short_timeout: float, grpc_like_a_gcs: int) -> None:
    pytest.importorskip("ray", reason="Ray is optional")
    from prune_env import optional_ray

    optional_ray.check_answers(f"127.0.0.1:{grpc_like_a_gcs}")  # answers as a head: accepted
    message = _refusal(f"ray://127.0.0.1:{grpc_like_a_gcs}", short_timeout)
    assert (
        f"answers as a Ray head (GCS), not as a Ray Client server: give it without ray:// (127.0.0.1:{grpc_like_a_gcs})"
        in message
    )


def test_a_host_that_never_resolves_is_refused_within_the_timeout(
    short_timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prune_env import optional_ray

    release = threading.Event()

    def hangs(*args: Any, **kwargs: Any) -> socket.socket:
        release.wait(30)  # name resolution has no timeout of its own
        raise OSError("released")

    monkeypatch.setattr(optional_ray.socket, "create_connection", hangs)
    try:
        message = _refusal("head-node.invalid:6379", short_timeout)
    finally:
        release.set()
    assert "does not answer within 2 s (no reply)" in message


def test_search_refuses_a_grpc_service_that_is_not_ray_before_any_work(
    short_timeout: float, grpc_not_ray: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is optional")
    from cli_output import one_error_line

    from prune_env.app import cli

    if ray.is_initialized():
        pytest.skip("this process is already connected to Ray: the address would not be probed")
    out = tmp_path / "run"
    started = time.monotonic()
    argv = ["search", "--agent", "random", "--no-progress", "--out", str(out)]
    assert cli.main([*argv, "--ray-address", f"127.0.0.1:{grpc_not_ray}"]) == 2
    assert time.monotonic() - started < short_timeout + 10  # was: ray.init waiting for ever
    line = one_error_line(capsys.readouterr().err)
    assert f"Ray address 127.0.0.1:{grpc_not_ray} answers gRPC, but no Ray head" in line
    assert not ray.is_initialized() and not out.exists()
