"""Files a run reads that someone else may have written: published weights in torch hub's and Hugging Face's
caches, ``--weights`` files, ``state.json`` and a predictor policy's ``policy.json``. Each is read without
unpickling code, and a damaged, hostile or inconsistent one is a typed one-line error naming the file and
the fix; a run's results and final log line say what was done (fine-tuned or not, which cost ratios)."""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from agents.policies import POLICY_META, load_policy
from agents.predictor import PREDICTOR_FILE, Ensemble, PredictorPolicy, PredictorSettings
from prune_env.app import cli
from prune_env.app.runfiles import STATE_FILE, STATE_FORMAT, read_state
from prune_env.app.weights import load_weights
from prune_env.errors import CheckpointError, InvalidSettingError, ResumeError
from prune_env.models import get_model


class Payload:
    """Unpickling it creates ``marker``: what a hostile checkpoint would do instead (run any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def hub_dir(tmp_path: Path) -> Iterator[Path]:
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def _hub_file(hub_dir: Path, name: str, weights: str) -> Path:
    """Where torchvision's weights ``name``/``weights`` are cached (the file name its url ends with)."""
    member = torchvision.models.get_model_weights(name)[weights]
    path = hub_dir / "checkpoints" / os.path.basename(member.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_the_planted_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload does run when a loader unpickles it fully (as torchvision's own loader does)."""
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "file.pth")
    torch.load(tmp_path / "file.pth", weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------ published weights


def _payload(path: Path, marker: Path) -> None:
    torch.save({"conv1.weight": Payload(marker)}, path)


def _nan(path: Path, marker: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)


def _foreign(path: Path, marker: Path) -> None:  # plain tensors, but not resnet18's
    torch.save({"weight": torch.zeros(3)}, path)


BAD_HUB_FILES = [
    ("pickled code", _payload, "unpickling it could run code"),
    ("empty", lambda path, marker: path.write_bytes(b""), "is empty"),
    ("text", lambda path, marker: path.write_text("not weights\n"), "is not a plain weights file"),
    ("NaN", _nan, "'layer1.0.conv1.weight' holds NaN"),
    ("another model's", _foreign, "does not hold torchvision's resnet18"),
]


@pytest.mark.parametrize(("what", "plant", "message"), BAD_HUB_FILES, ids=[b[0] for b in BAD_HUB_FILES])
def test_a_bad_cached_torchvision_file_is_refused_unread(
    hub_dir: Path, tmp_path: Path, what: str, plant: Callable[[Path, Path], None], message: str
) -> None:
    path = _hub_file(hub_dir, "resnet18", "IMAGENET1K_V1")
    marker = tmp_path / "payload-ran"
    plant(path, marker)
    with pytest.raises(CheckpointError) as caught:
        get_model("tv:resnet18@IMAGENET1K_V1", num_classes=10, in_channels=3)
    text = str(caught.value)
    assert message in text and path.name in text and "delete it and download it again" in text
    assert "\n" not in text
    assert not marker.exists(), "the payload planted in the torch hub cache ran"


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "densenet121"])
def test_a_genuine_cached_torchvision_file_loads(hub_dir: Path, name: str) -> None:
    """A state dict saved as torchvision publishes it (GoogLeNet's with its auxiliary heads, DenseNet's
    with its legacy layer names) initialises the model's body."""
    torch.manual_seed(0)
    extra = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    state = torchvision.models.get_model(name, weights=None, **extra).state_dict()
    if name == "densenet121":  # the published file's names: "norm.1" for today's "norm1"
        legacy = r"(denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$"
        state = {re.sub(legacy, r"\1.\2.\3", k): v for k, v in state.items()}
    torch.save(state, _hub_file(hub_dir, name, "IMAGENET1K_V1"))
    model = get_model(f"tv:{name}@IMAGENET1K_V1", num_classes=10, in_channels=3)
    loaded = model.state_dict()
    key = {"resnet18": "layer1.0.conv1.weight", "googlenet": "inception3a.branch1.conv.weight"}.get(
        name, "features.denseblock1.denselayer1.norm1.weight"
    )
    saved = key.replace(".norm1.", ".norm.1.") if name == "densenet121" else key
    torch.testing.assert_close(loaded[key], state[saved], rtol=0, atol=0)
    assert not any(k.startswith(("aux1.", "aux2.")) for k in loaded)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.fixture
def timm_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hugging Face cache's snapshot directory of timm's resnet18 weights (empty)."""
    pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    return repo / "snapshots" / "0"


def _timm_state(nan: bool = False) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    if nan:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    return {k: v.contiguous() for k, v in state.items()}


def _timm_nan(snapshot: Path, marker: Path) -> None:
    from safetensors.torch import save_file

    save_file(_timm_state(nan=True), str(snapshot / "model.safetensors"))


BAD_TIMM_FILES = [
    (
        "pickled code",
        lambda d, marker: _payload(d / "pytorch_model.bin", marker),
        "bin is not a plain weights",
    ),
    ("text", lambda d, marker: (d / "pytorch_model.bin").write_text("not weights\n"), "bin is not a plain"),
    ("NaN", _timm_nan, "safetensors: tensor 'layer1.0.conv1.weight' holds NaN"),
    ("truncated", lambda d, marker: (d / "model.safetensors").write_bytes(b"\x10"), "(SafetensorError: "),
]


@pytest.mark.parametrize(("what", "plant", "message"), BAD_TIMM_FILES, ids=[b[0] for b in BAD_TIMM_FILES])
def test_a_bad_file_in_the_timm_cache_is_refused_unread(
    timm_snapshot: Path, tmp_path: Path, what: str, plant: Callable[[Path, Path], None], message: str
) -> None:
    marker = tmp_path / "payload-ran"
    plant(timm_snapshot, marker)
    with pytest.raises(CheckpointError) as caught:
        get_model("timm:resnet18@pretrained", num_classes=10, in_channels=1)
    text = str(caught.value)
    assert message in text and "delete it and download it again" in text and "\n" not in text
    assert not marker.exists(), "the payload planted in the Hugging Face cache ran"


def test_a_genuine_file_in_the_timm_cache_loads(timm_snapshot: Path) -> None:
    state = _timm_state()
    torch.save(state, timm_snapshot / "pytorch_model.bin")
    model = get_model("timm:resnet18@pretrained", num_classes=10, in_channels=3)
    torch.testing.assert_close(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ --weights files


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_model("tiny", 10, 1).state_dict()


def _nan_weights(path: Path) -> None:
    state = _tiny_state()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("inf")
    torch.save(state, path)


BAD_WEIGHTS = [
    ("text", lambda path: path.write_text("not weights\n"), r"is not a loadable state_dict \(the file is"),
    ("empty", lambda path: path.write_bytes(b""), r"is not a loadable state_dict \(the file is empty"),
    ("NaN", _nan_weights, r": tensor '[\w.]+' holds NaN or infinite values.*; pass weights whose training"),
    ("a list", lambda path: torch.save([torch.zeros(1)], path), "does not hold a state_dict"),
]


@pytest.mark.parametrize(("what", "plant", "message"), BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_a_bad_weights_file_is_refused_naming_it(
    tmp_path: Path, what: str, plant: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "weights.pt"
    plant(path)
    with pytest.raises(InvalidSettingError, match=message) as caught:
        load_weights(get_model("tiny", 10, 1), path)
    assert str(caught.value).startswith(f"--weights {path}") and "\n" not in str(caught.value)


def test_a_good_weights_file_loads_through_a_link(tmp_path: Path) -> None:
    state = _tiny_state()
    torch.save(state, tmp_path / "weights.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "weights.pt")
    model = load_weights(get_model("tiny", 10, 1), tmp_path / "link.pt")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ state.json

GOOD_STATE = '{"format": %d, "settings": {"dataset": "digits", "importance": "l1"}, "evals_done": 0}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD_STATE.replace('"l1"', '"l1", "importance": "l2"'), "key 'importance' appears twice"),
        (GOOD_STATE.replace('"evals_done": 0', '"evals_done": 0, "best": NaN'), "NaN is not a JSON number"),
        (GOOD_STATE.replace('"l1"', '"l9"'), "importance 'l9' is not one of"),
        ("\udcff", "not UTF-8"),
    ],
    ids=["duplicate key", "NaN", "unknown importance", "not UTF-8"],
)
def test_an_edited_state_file_is_refused_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(text.replace("%d", str(STATE_FORMAT)).encode("utf-8", "surrogateescape"))
    with pytest.raises(ResumeError, match=message) as caught:
        read_state(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_a_good_state_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    path.write_text(GOOD_STATE % STATE_FORMAT)
    assert read_state(path)["settings"]["importance"] == "l1"


# ------------------------------------------------------------------------------------ predictor policy


@pytest.fixture
def predictor_dir(tmp_path: Path) -> Path:
    """A tiny predictor policy (2 members, 4 hidden units, 3 groups) saved by the public API."""
    model = Ensemble(3, 2, 4, torch.Generator().manual_seed(0))
    policy = PredictorPolicy(PredictorSettings(ensemble=2, hidden=4), model, (0.1, 0.2, 0.3), (0.3, 0.7))
    return policy.save(tmp_path / "policy")


def _edit_settings(directory: Path, **settings: int) -> None:
    meta = json.loads((directory / POLICY_META).read_text())
    meta["settings"].update(settings)
    (directory / POLICY_META).write_text(json.dumps(meta))


@pytest.mark.parametrize("settings", [{"hidden": 1_000_000}, {"ensemble": 1_000_000}, {"hidden": 5}])
def test_predictor_settings_that_disagree_with_its_tensors_are_refused_before_building(
    predictor_dir: Path, settings: dict[str, int]
) -> None:
    assert isinstance(load_policy(predictor_dir), PredictorPolicy)  # as saved, it loads
    _edit_settings(predictor_dir, **settings)
    with pytest.raises(
        InvalidSettingError,
        match=rf"^{re.escape(str(predictor_dir / POLICY_META))}: .*{PREDICTOR_FILE} holds",
    ):
        load_policy(predictor_dir)


def test_predictor_tensors_missing_with_huge_settings_are_refused_before_building(
    predictor_dir: Path,
) -> None:
    state = torch.load(predictor_dir / PREDICTOR_FILE, weights_only=True)
    del state["w2"]
    torch.save(state, predictor_dir / PREDICTOR_FILE)
    _edit_settings(predictor_dir, hidden=1_000_000)
    with pytest.raises(
        InvalidSettingError, match=rf"{PREDICTOR_FILE}: the ensemble's tensors 'w2' are absent"
    ):
        load_policy(predictor_dir)


# ------------------------------------------------------------------------------------ a run's own report


@pytest.mark.parametrize(
    ("budget", "epochs", "ratios"),
    [
        (["--target-params", "0.5"], 0, r"; params ratio \d\.\d{3}; saved to"),
        (["--target-macs", "0.5"], 1, r"; macs ratio \d\.\d{3}, params ratio \d\.\d{3}; saved to"),
    ],
    ids=["params, not fine-tuned", "macs, fine-tuned"],
)
def test_the_results_and_final_line_say_what_was_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: list[str], epochs: int, ratios: str
) -> None:
    """A tiny model from given weights (nothing trained): the final line names each cost ratio once, and
    a model not fine-tuned is not reported as fine-tuned."""
    torch.save(_tiny_state(), tmp_path / "tiny.pt")
    monkeypatch.setenv("PRUNE_ENV_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["search", "--agent", "random", "--eval-samples", "96", "--no-progress", "--model", "tiny"]
    args += ["--dataset", "digits", "--weights", str(tmp_path / "tiny.pt"), "--evals", "2", "--out", str(out)]
    assert cli.main([*args, *budget, "--finetune-epochs", str(epochs)]) == 0
    last = (out / "log.txt").read_text().strip().splitlines()[-1]
    assert re.search(ratios, last), last
    assert last.count("params ratio") == 1, last
    results = json.loads((out / "results.json").read_text())
    assert results["finetuned"] is (epochs > 0)
    assert (results["finetuned_val_accuracy"] is None) is (epochs == 0)
    assert results["finetune_epochs"] == epochs
    assert 0.0 <= results["test_accuracy"] <= 1.0  # the saved model's, fine-tuned or not
