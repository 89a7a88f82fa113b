from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import prune_env
from prune_env.errors import InvalidSettingError, PruneEnvError, UnknownNameError
from prune_env.models import available_models, get_model, register_model

SMALL = ["tiny", "resnet20", "resnet32", "resnet44", "resnet56", "vgg11", "mobilenetv2"]


def test_available_models_lists_the_zoo() -> None:
    names = available_models()
    for name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11", "vgg16", "vgg19"):
        assert name in names
    assert "mobilenetv2" in names
    assert "tiny" in names


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize(("in_channels", "size", "classes"), [(1, 8, 10), (3, 32, 100)])
def test_model_shapes_and_traceable(name: str, in_channels: int, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=classes, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, classes)
    # fx-traceable and the trace computes the same function (no data-dependent control flow).
    traced = torch.fx.symbolic_trace(model)
    with torch.inference_mode():
        assert torch.allclose(traced(x), y)


def test_resnet_depths_and_block_counts() -> None:
    for depth in (20, 32, 44, 56, 110):
        model = get_model(f"resnet{depth}", 10, 3)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == depth - 1  # stem + 2 per block; the last layer is the linear classifier
    with pytest.raises(ValueError, match="6n\\+2"):
        prune_env.models.cifar_resnet.CifarResNet(21)


@pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0, 1.4])
def test_mobilenetv2_width_rounds_channels_as_torchvision(width: float) -> None:
    import torchvision

    ours = prune_env.models.mobilenetv2(10, 3, width=width)
    reference = torchvision.models.mobilenet_v2(width_mult=width)
    block_outputs = [b.conv[-1].num_features for b in ours.features if hasattr(b, "use_residual")]
    assert block_outputs == [b.out_channels for b in reference.features[1:-1]]
    assert ours.features[0].out_channels == reference.features[0][0].out_channels


@pytest.mark.parametrize("name", ["resnet20", "vgg11_quarter", "mobilenetv2_half"])
def test_zoo_cnns_run_channels_last_with_the_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, 10, 1).eval()
    seen: list[torch.Tensor] = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(3, 1, 28, 28)  # one channel: NCHW and NHWC strides would both call it contiguous
    with torch.inference_mode():
        fast = model(x)
        model.channels_last = False
        reference = model(x)
    assert seen[0].stride(1) == 1 and seen[1].stride(1) != 1  # the layout really differs
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


def test_half_width_mobilenetv2_is_a_quarter_of_the_macs() -> None:
    example = torch.zeros(1, 1, 28, 28)
    full = prune_env.count_macs(get_model("mobilenetv2", 10, 1), example)
    half = prune_env.count_macs(get_model("mobilenetv2_half", 10, 1), example)
    assert 0.25 < half / full < 0.32


def test_resnet_projection_shortcuts_make_every_stage_prunable() -> None:
    model = get_model("resnet20", 10, 1)
    example = torch.zeros(1, 1, 8, 8)
    graph = prune_env.build_graph(model, example)
    pruned = prune_env.prune(model, example, 0.5)
    # Every group, including the three residual (stage) groups, lost channels.
    widths = sorted(m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d))
    assert max(widths) == 32
    assert len(graph.groups) == 12
    assert prune_env.count_macs(pruned, example) < 0.35 * prune_env.count_macs(model, example)
    assert pruned(example).shape == (1, 10)


def test_torchvision_model_adapts_stem_and_classes() -> None:
    model = get_model("tv:resnet18", num_classes=7, in_channels=1)
    stem = model.conv1
    assert stem.in_channels == 1
    assert (stem.kernel_size, stem.stride, stem.padding, stem.out_channels) == ((7, 7), (2, 2), (3, 3), 64)
    assert model.fc.out_features == 7
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    # Models whose stem sits deep inside a Sequential are adapted too.
    mnv3 = get_model("tv:mobilenet_v3_small", num_classes=5, in_channels=2).eval()
    assert mnv3(torch.randn(2, 2, 32, 32)).shape == (2, 5)


def test_unknown_model_names_list_the_options() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_model("resnet21")
    assert "resnet20" in str(info.value)
    assert "tv:" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownNameError, match="resnet18") as tv_info:
        get_model("tv:not_a_model")
    assert isinstance(tv_info.value, PruneEnvError)


def test_get_model_accepts_modules_and_factories() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    assert get_model(module) is module
    built = get_model(lambda: nn.Linear(2, 2))
    assert isinstance(built, nn.Linear)
    with pytest.raises(InvalidSettingError, match=r"not an nn\.Module"):
        get_model(lambda: 3)


def test_register_model() -> None:
    register_model("test-linear", lambda num_classes, in_channels: nn.Linear(in_channels, num_classes))
    try:
        assert "test-linear" in available_models()
        model = get_model("test-linear", num_classes=3, in_channels=5)
        assert (model.in_features, model.out_features) == (5, 3)
        with pytest.raises(ValueError, match="reserved"):
            register_model("tv:mine", lambda n, c: nn.Identity())
    finally:
        prune_env.models._REGISTRY.pop("test-linear", None)
