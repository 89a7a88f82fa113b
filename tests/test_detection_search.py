"""A detector searched with the user's own metric: checked detection data, mAP, a problem without a
classification dataset, and a search end to end on a synthetic set with a tiny detector trained here."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import agents
import prune_env
from prune_env import InvalidSettingError, MetricProxy, PruningProblem
from prune_env.detection import (
    check_detection_samples,
    mean_average_precision,
    synthetic_shapes,
    tiny_detector,
    torchvision_detector,
    train_detector,
)
from prune_env.errors import DatasetError, PruneEnvError


def test_torchvision_detector_is_the_same_on_every_call_and_leaves_the_callers_random_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = torchvision_detector("ssdlite320_mobilenet_v3_large")
    assert torch.equal(torch.rand(4), expected)  # the caller's stream goes on as if nothing had drawn from it
    second = torchvision_detector("ssdlite320_mobilenet_v3_large")
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


class Oracle(nn.Module):
    """A "detector" that returns fixed detections per image, to compute mAP on by hand."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs
        self.scale = nn.Parameter(torch.ones(1))  # mean_average_precision reads the device from it

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.outputs[: len(images)]


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_synthetic_shapes_are_valid_seeded_and_include_empty_images() -> None:
    samples = synthetic_shapes(64, size=48, seed=3)
    check_detection_samples(samples)
    again = synthetic_shapes(64, size=48, seed=3)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
        for a, b in zip(samples, again, strict=True)
    )
    assert not torch.equal(samples[0][0], synthetic_shapes(1, size=48, seed=4)[0][0])
    counts = [len(t["labels"]) for _, t in samples]
    assert 0 in counts and max(counts) <= 3
    assert {int(c) for _, t in samples for c in t["labels"]} == {1, 2}
    assert samples[0][0].shape == (3, 48, 48) and samples[0][0].dtype == torch.float32


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (_target([[10, 10, 5, 20]], [1]), r"samples\[1\]: box 0 is \[10.0, 10.0, 5.0, 20.0\]"),
        (_target([[0, 0, 8, 8], [1, 1, 40, 9]], [1, 2]), r"samples\[1\]: box 1 .* inside the 32×32 image"),
        (_target([[0, 0, float("nan"), 8]], [1]), r"samples\[1\]: box 0 is \[0.0, 0.0, nan, 8.0\]"),
        (
            {"boxes": torch.zeros(2, 5), "labels": torch.tensor([1, 1])},
            r"samples\[1\]: boxes must be an \(N, 4\)",
        ),
        (_target([[0, 0, 8, 8]], [0]), r"samples\[1\]: labels must be ≥ 1 \(0 is the background"),
        (
            {"boxes": torch.tensor([[0.0, 0, 8, 8]]), "labels": torch.tensor([1.0])},
            r"samples\[1\]: labels must be 1 integers",
        ),
        ({"boxes": torch.zeros(0, 4)}, r"samples\[1\]: the target must be a dict with 'boxes' and 'labels'"),
    ],
)
def test_malformed_boxes_are_refused_naming_the_sample(target: dict[str, torch.Tensor], message: str) -> None:
    image = torch.rand(3, 32, 32)
    with pytest.raises(DatasetError, match=message):
        check_detection_samples([(image, _target([], [])), (image, target)])


def test_an_image_without_boxes_is_accepted() -> None:
    check_detection_samples([(torch.rand(3, 32, 32), _target([], []))])
    check_detection_samples(
        [(torch.rand(3, 32, 32), {"boxes": torch.zeros(0, 4), "labels": torch.tensor([])})]
    )
    with pytest.raises(DatasetError, match=r"samples\[0\]: the image must be a float tensor \(C, H, W\)"):
        check_detection_samples([(torch.zeros(3, 32, 32, dtype=torch.uint8), _target([], []))])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: synthetic_shapes(0), r"n must be an integer >= 1, got 0"),
        (lambda: synthetic_shapes(4, size=8), r"size must be an integer >= 16, got 8"),
        (lambda: synthetic_shapes(4, max_objects=True), r"max_objects must be an integer, got True"),
        (lambda: tiny_detector(num_classes=1), r"num_classes must be an integer >= 2, got 1"),
        (lambda: tiny_detector(width=40), r"width must be a multiple of 16 .* got 40"),
        (
            lambda: torchvision_detector("yolo"),
            r"unknown torchvision detector 'yolo'; known: .*fcos_resnet50_fpn",
        ),
        (
            lambda: train_detector(tiny_detector(), synthetic_shapes(2), epochs=0),
            r"epochs must be an integer >= 1",
        ),
        (lambda: train_detector(tiny_detector(), synthetic_shapes(2), lr=0), r"lr must be above 0, got 0"),
        (
            lambda: train_detector(tiny_detector(), synthetic_shapes(2), lr=float("nan")),
            r"lr must be a finite",
        ),
        (
            lambda: mean_average_precision(tiny_detector(), synthetic_shapes(2), iou=0),
            r"iou must be in \(0, 1\]",
        ),
        (
            lambda: mean_average_precision(tiny_detector(), synthetic_shapes(2), batch_size=0),
            r"batch_size must",
        ),
    ],
)
def test_bad_arguments_of_the_detection_helpers_are_refused_naming_them(call: object, message: str) -> None:
    with pytest.raises(PruneEnvError, match=message):
        call()  # type: ignore[operator]


def test_map_is_one_for_the_ground_truth_and_matches_a_hand_computed_case() -> None:
    truth = _target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])
    samples = [(torch.rand(3, 32, 32), truth)]
    exact = {"boxes": truth["boxes"], "scores": torch.tensor([0.9, 0.8]), "labels": truth["labels"]}
    assert mean_average_precision(Oracle([exact]), samples) == 1.0
    nothing = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    assert mean_average_precision(Oracle([nothing]), samples) == 0.0
    # hit (0.9), a box overlapping nothing (0.8), hit (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;
    # the envelope is 1 up to recall 1/2, then 2/3: AP = 1/2 · 1 + 1/2 · 2/3.
    ranked = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [12, 0, 18, 6], [20, 20, 30, 30]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 1, 1]),
    }
    assert mean_average_precision(Oracle([ranked]), samples) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # A second detection of a matched box is a false positive; a class without ground truth is not averaged.
    double = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [5, 5, 9, 9]]),
        "scores": torch.tensor([0.9, 0.8, 0.95]),
        "labels": torch.tensor([1, 1, 2]),
    }
    assert mean_average_precision(Oracle([double]), samples) == pytest.approx(0.5)


def test_a_problem_without_a_dataset_needs_a_module_a_metric_and_an_example() -> None:
    model = tiny_detector()
    images = [torch.rand(3, 64, 64)]
    proxy = MetricProxy(lambda m: 0.5)
    with pytest.raises(InvalidSettingError, match=r"needs proxy= \(a MetricProxy.*example_inputs="):
        PruningProblem(model, None)
    with pytest.raises(InvalidSettingError, match=r"needs model= as a trained nn.Module"):
        PruningProblem("resnet20", None, proxy=proxy, example_inputs=(images,))
    with pytest.raises(InvalidSettingError, match=r"importance='taylor' read\(s\) the dataset"):
        PruningProblem(model, None, proxy=proxy, example_inputs=(images,), importance="taylor")
    with pytest.raises(
        InvalidSettingError, match=r"example_inputs\[0\] must be a tensor or a list of tensors"
    ):
        PruningProblem(model, None, proxy=proxy, example_inputs=(["image.png"],))
    problem = PruningProblem(model, None, proxy=proxy, example_inputs=(images,), target_macs=0.5)
    with pytest.raises(InvalidSettingError, match=r"built without a dataset \(dataset=None\).*pass dataset="):
        problem.data  # noqa: B018


def test_a_detector_searched_with_its_map_meets_the_budget_and_fine_tunes() -> None:
    train, val = synthetic_shapes(160, seed=0), synthetic_shapes(48, seed=1)
    torch.manual_seed(
        0
    )  # the detector's initial weights: whatever ran before in this process must not matter
    base = train_detector(tiny_detector(), train, epochs=4, progress=False)
    base_map = mean_average_precision(base, val)
    assert base_map > 0.2  # it learned something: the search has a signal to keep

    metric = functools.partial(mean_average_precision, samples=val)
    recalibration = [[image for image, _ in train[i : i + 16]] for i in range(0, 64, 16)]
    problem = PruningProblem(
        base, None, proxy=MetricProxy(metric, recalibration_batches=recalibration),
        example_inputs=([val[0][0]],), target_macs=0.5, max_ratio=0.8,
    )  # fmt: skip
    assert problem.base_accuracy == pytest.approx(mean_average_precision(problem.proxy.prepare(base), val))
    result = agents.search("random", problem, budget_evals=6, seed=0)
    keep = result.best_keep
    measured = prune_env.count_macs(problem.build(keep), ([val[0][0]],))
    assert measured / problem.graph.base_macs == pytest.approx(result.best_outcome.macs_ratio)
    assert result.best_outcome.macs_ratio <= 0.5
    scored = problem.scored_model(keep)
    assert mean_average_precision(scored, val) == pytest.approx(result.best_outcome.accuracy)
    tuned = train_detector(scored, train, epochs=2, lr=0.005, progress=False)
    assert mean_average_precision(tuned, val) > mean_average_precision(scored, val)
    assert np.isfinite(base_map)


@pytest.mark.parametrize("env_type", ["OneShotPruneEnv", "LayerPruneEnv"])
def test_both_environments_take_a_problem_scored_by_the_users_metric(env_type: str) -> None:
    val = synthetic_shapes(8, seed=1)
    calls: list[int] = []

    def metric(model: nn.Module) -> float:
        calls.append(1)
        return mean_average_precision(model, val)

    problem = PruningProblem(
        tiny_detector(), None, proxy=MetricProxy(metric), example_inputs=([val[0][0]],), target_macs=0.5
    )
    env = getattr(prune_env, env_type)(problem=problem)
    env.reset(seed=0)
    before, done, info = len(calls), False, {}
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert len(calls) == before + 1  # the episode's pruned model was scored by the user's metric
    assert info["macs_ratio"] <= 0.5 and reward == pytest.approx(info["accuracy"])
