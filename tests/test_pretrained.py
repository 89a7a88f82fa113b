"""Published weights as a starting point ("tv:NAME@WEIGHTS", "timm:NAME@pretrained"), read from the local
caches only: the cache is faked with a state_dict saved where torchvision and timm would have put it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from prune_env.errors import UnknownNameError, WeightsNotFoundError
from prune_env.models import check_model_name, get_model
from prune_env.models.pretrained import adapt_input_weight


@pytest.fixture
def hub_dir(tmp_path: Path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def cached_torchvision_weights(hub_dir: Path, name: str, weights: str) -> dict[str, torch.Tensor]:
    """A random state_dict of ``name`` saved as the file of ``weights`` in the torch hub cache."""
    member = torchvision.models.get_model_weights(name)[weights]
    torch.manual_seed(1)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    path = hub_dir / "checkpoints" / os.path.basename(member.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_initialise_the_body_adapt_the_stem_and_reset_the_head(hub_dir: Path) -> None:
    state = cached_torchvision_weights(hub_dir, "resnet18", "IMAGENET1K_V1")
    model = get_model("tv:resnet18@IMAGENET1K_V1", num_classes=10, in_channels=1)
    torch.testing.assert_close(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True), rtol=0, atol=0)
    assert model.fc.out_features == 10
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # DEFAULT is the recommended member's alias: the same file
    default = get_model("tv:resnet18@DEFAULT", num_classes=10, in_channels=3)
    torch.testing.assert_close(default.conv1.weight, state["conv1.weight"], rtol=0, atol=0)


def test_missing_weights_are_a_typed_error_naming_the_file_before_any_work(hub_dir: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"checkpoints.*resnet18-.*\.pth.*--weights PATH"):
        check_model_name("tv:resnet18@IMAGENET1K_V1")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tv:resnet18@IMAGENET9K", "unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"),
        ("tv:resnet18@", "no weights after '@'"),
        ("resnet20@DEFAULT", "tv:NAME' and 'timm:NAME' models only"),
        ("timm:resnet18@IMAGENET1K_V1", "timm:resnet18@pretrained"),
    ],
)
def test_bad_weights_names_are_refused(spec: str, message: str) -> None:
    with pytest.raises(UnknownNameError, match=message):
        check_model_name(spec)


def test_timm_weights_come_from_the_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match=r"resnet18.*timm\.create_model"):
        check_model_name("timm:resnet18@pretrained")
    torch.manual_seed(2)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    snapshot = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0")
    model = get_model("timm:resnet18@pretrained", num_classes=10, in_channels=1)
    torch.testing.assert_close(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)
    assert model.conv1.weight.shape[1] == 1
    assert model.fc.out_features == 10


def test_input_weights_for_other_channel_counts_keep_the_response_to_a_grey_image() -> None:
    weight = torch.randn(4, 3, 3, 3)
    grey = torch.randn(1, 1, 5, 5)
    rgb_response = torch.nn.functional.conv2d(grey.expand(1, 3, 5, 5), weight)
    for channels in (1, 6):  # exact where the RGB filters divide evenly among the channels
        adapted = adapt_input_weight(weight, channels)
        assert adapted.shape == (4, channels, 3, 3)
        response = torch.nn.functional.conv2d(grey.expand(1, channels, 5, 5), adapted)
        torch.testing.assert_close(response, rgb_response)
    assert adapt_input_weight(weight, 2).shape == (4, 2, 3, 3)
