"""Detectors and segmentation models: captured from a run where torch.fx cannot trace them, pruned exactly.

torchvision's detectors take a list of images and post-process data-dependently (anchors, NMS, RoI
sampling): symbolic tracing fails on them, a captured run does not. A capture must still refuse a model
whose layers depend on a branch on values, since one run shows only one branch.
"""

from __future__ import annotations

import pytest
import torch
from detection_checks import check_pruned_detector, check_pruned_segmenter
from torch import nn

import prune_env
from prune_env import InvalidSettingError, UntraceableModelError
from prune_env.surgery import prune_channels, zero_units

DETECTORS = [
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
]
SEGMENTERS = [
    "lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "fcn_resnet50",
]


class TinyDetector(nn.Module):
    """A list of images in; per image, the top-k scoring positions above a threshold out — the shape of a
    detector's outer forward, which torch.fx cannot trace (a list input, data-dependent sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.neck = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.score = nn.Conv2d(6, 1, 1)
        self.box = nn.Conv2d(6, 4, 1)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        x = torch.stack(images)
        features = torch.relu(self.up(torch.relu(self.neck(torch.relu(self.stem(x))))))
        scores, boxes = self.score(features).flatten(1), self.box(features).flatten(2)
        results = []
        for s, b in zip(scores, boxes, strict=True):
            keep = torch.nonzero(s > s.mean()).flatten()[:5]  # data-dependent: after every layer ran
            if keep.numel() and bool(s[keep].max() > -1e9):
                results.append({"scores": s[keep], "boxes": b[:, keep].T})
            else:
                results.append({"scores": s[:0], "boxes": b[:, :0].T})
        return results


class GatedBlock(nn.Module):
    """Runs ``conv`` only when the input's sum is positive: a run shows one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.gate = GatedBlock()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.gate(self.stem(torch.stack(images))))


def _images(n: int = 2, size: int = 8) -> list[torch.Tensor]:
    return [torch.rand(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_a_list_input_model_is_captured_and_pruned_exactly() -> None:
    model, images = TinyDetector().eval(), _images()
    graph = prune_env.build_graph(model, (images,))
    # stem, neck and the transposed conv's outputs prune; the score and box outputs are a format.
    assert sorted(g.name for g in graph.groups) == ["neck", "stem", "up"]
    pruned = prune_env.prune(model, (images,), 0.5, graph=graph)
    assert (pruned.up.in_channels, pruned.up.out_channels, pruned.box.out_channels) == (4, 3, 4)
    assert graph.macs(0.5) == prune_env.count_macs(pruned, (images,)) < graph.base_macs
    assert graph.base_macs == prune_env.count_macs(model, (images,))
    with torch.no_grad():
        out = pruned(images)
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)


def test_a_captured_model_runs_once_per_build() -> None:
    # Propagation replays the recorded run's values: a detector's forward (seconds for a two-stage one)
    # is paid once, not again for the channel analysis.
    model, calls = TinyDetector().eval(), []
    model.stem.register_forward_hook(lambda *_: calls.append(1))
    prune_env.build_graph(model, (_images(),))
    assert len(calls) == 1


def test_zero_contribution_channels_removed_through_a_transposed_conv_change_nothing() -> None:
    model, images = TinyDetector().eval(), _images()
    graph = prune_env.build_graph(model, (images,))
    drop = {g.name: list(range(0, g.units, 2)) for g in graph.groups}
    zero_units(model, graph, drop)
    keep = {g.name: [u for u in range(g.units) if u not in drop[g.name]] for g in graph.groups}
    pruned = prune_channels(model, graph, keep)
    with torch.no_grad():
        expected, got = model(images), pruned(images)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g["scores"], e["scores"])
        torch.testing.assert_close(g["boxes"], e["boxes"])


def test_a_branch_on_values_before_a_layer_is_refused_naming_the_module_and_the_fix() -> None:
    model = GatedNet().eval()
    for sign in (1.0, -1.0):  # whichever branch the example takes, the other could run other layers
        images = [sign * torch.ones(3, 8, 8)]
        with pytest.raises(
            UntraceableModelError, match=r"(?s)'gate' \(GatedBlock\).*__bool__.*leaf_modules=\[GatedBlock\]"
        ):
            prune_env.build_graph(model, (images,))
    graph = prune_env.build_graph(model, ([torch.ones(3, 8, 8)],), leaf_modules=[GatedBlock])
    assert list(graph.groups) == []  # stem → gate → head: the leaf's channels stay whole


def test_example_inputs_that_are_not_tensors_are_refused_naming_the_value() -> None:
    with pytest.raises(InvalidSettingError, match=r"example_inputs\[0\].*list holding a str"):
        prune_env.build_graph(TinyDetector(), (["image.png"],))
    with pytest.raises(InvalidSettingError, match=r"the model cannot run on the example input \(\(3, 8\)"):
        prune_env.build_graph(TinyDetector(), ([torch.rand(3, 8)],))


def test_a_small_detector_prunes_exactly_and_trains() -> None:
    kept = check_pruned_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    assert kept < 0.6


def test_a_small_segmenter_prunes_exactly_and_trains() -> None:
    assert check_pruned_segmenter("lraspp_mobilenet_v3_large") < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS)
def test_every_torchvision_detector_prunes_exactly_and_trains(name: str) -> None:
    assert check_pruned_detector(name) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", SEGMENTERS)
def test_every_torchvision_segmenter_prunes_exactly_and_trains(name: str) -> None:
    assert check_pruned_segmenter(name) < 0.6
