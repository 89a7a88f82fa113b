"""Tampered, broken and inconsistent saved-model directories: each one is refused with a CheckpointError
naming the file and the problem — from ``load_pruned`` and, through ``prune-env eval``, in one line."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_output import one_error_line

from prune_env.app import cli
from prune_env.checkpoint import (
    FORMAT,
    SPEC_FILE,
    WEIGHTS_FILE,
    load_pruned,
    read_spec,
    save_pruned,
    validate_spec,
)
from prune_env.errors import CheckpointError, InvalidSettingError
from prune_env.graph import build_graph
from prune_env.models import get_model
from prune_env.surgery import prune_channels

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real saved model (the tiny zoo CNN, half of every group kept), as `prune-env search` writes one."""
    torch.manual_seed(0)
    base = get_model("tiny", num_classes=10, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, *SHAPE))
    keep = {g.name: list(range(0, g.units, 2)) for g in graph.groups}
    directory = tmp_path_factory.mktemp("saved") / "model"
    save_pruned(directory, prune_channels(base, graph, keep), keep=keep, input_shape=SHAPE,
                architecture="tiny", num_classes=10, in_channels=1,
                meta={"dataset": "digits", "seed": 0})  # fmt: skip
    return directory


@pytest.fixture
def model_dir(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved model to tamper with."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


# ------------------------------------------------------------------------------------------------ tampering


def _edit_spec(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        spec = json.loads((d / SPEC_FILE).read_text())
        change(spec)
        (d / SPEC_FILE).write_text(json.dumps(spec))

    return tamper


def _set(key: str, value: Any) -> Callable[[Path], None]:
    return _edit_spec(lambda spec: spec.__setitem__(key, value))


def _delete(key: str) -> Callable[[Path], None]:
    return _edit_spec(lambda spec: spec.__delitem__(key))


def _first_group(change: Callable[[list[int]], Any]) -> Callable[[Path], None]:
    def edit(spec: dict[str, Any]) -> None:
        name = next(iter(spec["keep"]))
        spec["keep"][name] = change(spec["keep"][name])

    return _edit_spec(edit)


def _spec_text(text: str | bytes) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / SPEC_FILE).write_bytes(text.encode() if isinstance(text, str) else text)

    return tamper


def _weights_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        w = d / WEIGHTS_FILE
        w.write_bytes(change(w.read_bytes()))

    return tamper


def _edit_weights(change: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        state = torch.load(d / WEIGHTS_FILE, weights_only=True)
        torch.save(change(state), d / WEIGHTS_FILE)

    return tamper


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key].view(-1)[0] = value
        return state

    return change


class _Payload:
    """Unpickling this would create a marker file: the proof that loading ran code from the file."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _pickle_payload(raw: bool) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        payload = _Payload()
        payload.marker = str(d / "PWNED")
        if raw:
            (d / WEIGHTS_FILE).write_bytes(pickle.dumps(payload))
        else:
            torch.save({"conv.weight": payload}, d / WEIGHTS_FILE)

    return tamper


def _symlink(name: str) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        real = d.parent / f"elsewhere-{name}"
        os.replace(d / name, real)
        os.symlink(real, d / name)

    return tamper


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()

    return tamper


def _remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


TAMPERED: dict[str, tuple[Callable[[Path], None], str]] = {
    # model.pt: not plain tensors, damaged, missing, not a regular file, non-finite or misfitting
    "pickle-payload-in-state-dict": (_pickle_payload(raw=False), "not a plain weights file"),
    "raw-pickle-payload": (_pickle_payload(raw=True), "not a plain weights file"),
    "weights-truncated": (_weights_bytes(lambda b: b[: len(b) // 2]), "damaged or truncated"),
    "weights-empty": (_weights_bytes(lambda b: b""), "is empty"),
    "weights-garbage": (_weights_bytes(lambda b: b"\x00not a zip" * 50), "not a plain weights file"),
    "weights-text": (_weights_bytes(lambda b: b"hello world" * 50), "damaged or truncated"),
    "weights-missing": (_remove(WEIGHTS_FILE), "is missing"),
    "weights-symlink": (_symlink(WEIGHTS_FILE), "symbolic link"),
    "weights-directory": (_replace_with_dir(WEIGHTS_FILE), "not a regular file"),
    "weights-a-list": (_edit_weights(lambda s: list(s.values())), "does not hold a state_dict"),
    "weights-non-tensor-value": (_edit_weights(lambda s: {**s, "extra": 3}), "does not hold a state_dict"),
    "weights-nan": (_edit_weights(_poison(math.nan)), "NaN or infinite"),
    "weights-inf": (_edit_weights(_poison(math.inf)), "NaN or infinite"),
    "weights-extra-tensor": (_edit_weights(lambda s: {**s, "spy": torch.zeros(1)}), "do not fit"),
    "weights-tensor-dropped": (_edit_weights(lambda s: dict(list(s.items())[1:])), "do not fit"),
    # model.json: not a regular file, not JSON, wrong types or ranges anywhere
    "spec-missing": (_remove(SPEC_FILE), "no saved pruned model"),
    "spec-symlink": (_symlink(SPEC_FILE), "symbolic link"),
    "spec-directory": (_replace_with_dir(SPEC_FILE), "not a regular file"),
    "spec-empty": (_spec_text(""), "not valid JSON"),
    "spec-not-json": (_spec_text("{format: 2"), "not valid JSON"),
    "spec-not-utf8": (_spec_text(b"\xff\xfe{}"), "not UTF-8"),
    "spec-nan-literal": (_spec_text('{"format": NaN}'), "not valid JSON"),
    "spec-duplicate-key": (_spec_text('{"format": 2, "format": 1}'), "appears twice"),
    "spec-a-list": (_spec_text("[1, 2]"), "expected a JSON object"),
    "format-newer": (_set("format", FORMAT + 1), "upgrade prune_env"),
    "format-zero": (_set("format", 0), "'format'"),
    "format-string": (_set("format", "2"), "'format'"),
    "format-bool": (_set("format", True), "'format'"),
    "keep-key-missing": (_delete("keep"), "missing 'keep'"),
    "macs-key-missing": (_delete("macs"), "missing 'macs'"),
    "architecture-number": (_set("architecture", 20), "'architecture'"),
    "architecture-empty": (_set("architecture", ""), "'architecture'"),
    "architecture-unknown": (_set("architecture", "resnet21"), "cannot rebuild architecture"),
    "num-classes-zero": (_set("num_classes", 0), "'num_classes'"),
    "num-classes-huge": (_set("num_classes", 10**9), "'num_classes'"),
    "num-classes-float": (_set("num_classes", 10.0), "'num_classes'"),
    "num-classes-bool": (_set("num_classes", True), "'num_classes'"),
    "num-classes-string": (_set("num_classes", "10"), "'num_classes'"),
    "num-classes-vs-weights": (_set("num_classes", 7), "do not fit"),
    "in-channels-negative": (_set("in_channels", -1), "'in_channels'"),
    "in-channels-vs-input-shape": (_set("in_channels", 3), "has 1 channels but 'in_channels' is 3"),
    "in-channels-vs-weights": (
        _edit_spec(lambda s: s.update(in_channels=3, input_shape=[3, 8, 8])),
        "do not fit",
    ),
    "input-shape-string": (_set("input_shape", "1x8x8"), "'input_shape'"),
    "input-shape-empty": (_set("input_shape", []), "'input_shape'"),
    "input-shape-zero": (_set("input_shape", [1, 0, 8]), "'input_shape'"),
    "input-shape-negative": (_set("input_shape", [1, -8, 8]), "'input_shape'"),
    "input-shape-float": (_set("input_shape", [1, 8.0, 8]), "'input_shape'"),
    "input-shape-bool": (_set("input_shape", [1, True, 8]), "'input_shape'"),
    "input-shape-too-many-dims": (_set("input_shape", [1, 8, 8, 8, 8]), "'input_shape'"),
    "input-shape-side-too-large": (_set("input_shape", [1, 8, 10**6]), "'input_shape'"),
    "input-shape-too-many-values": (_set("input_shape", [1, 16384, 16384]), "'input_shape'"),
    # The weights do not fix the input size (global pooling takes any): the recorded costs do.
    "input-shape-512px": (_set("input_shape", [1, 512, 512]), "records"),
    "input-shape-16px": (_set("input_shape", [1, 16, 16]), "records"),
    "macs-edited": (_edit_spec(lambda s: s.update(macs=s["macs"] + 1)), "records"),
    "params-edited": (_edit_spec(lambda s: s.update(params=s["params"] * 2)), "records"),
    "macs-negative": (_set("macs", -1), "'macs'"),
    "params-float": (_set("params", 1.5), "'params'"),
    "keep-a-list": (_set("keep", [[0, 1]]), "'keep'"),
    "keep-group-empty": (_first_group(lambda units: []), "non-empty list"),
    "keep-group-not-a-list": (_first_group(lambda units: 3), "non-empty list"),
    "keep-negative-unit": (_first_group(lambda units: [-1, *units[1:]]), "non-negative integers"),
    "keep-float-unit": (_first_group(lambda units: [0.5]), "non-negative integers"),
    "keep-bool-unit": (_first_group(lambda units: [True]), "non-negative integers"),
    "keep-string-unit": (_first_group(lambda units: ["0"]), "non-negative integers"),
    "keep-duplicate-unit": (_first_group(lambda units: [units[0], *units]), "twice"),
    "keep-unit-out-of-range": (_first_group(lambda units: [*units[:-1], 10**6]), "units but keep lists"),
    "keep-one-unit-fewer": (_first_group(lambda units: units[:-1]), "do not fit"),
    "keep-unknown-group": (
        _edit_spec(lambda s: s["keep"].update({"no.such.layer": [0]})),
        "does not have",
    ),
    "meta-a-list": (_set("meta", ["digits"]), "'meta'"),
    "versions-not-strings": (_set("versions", {"torch": 2}), "'versions'"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_directory_raises_checkpoint_error(case: str, model_dir: Path) -> None:
    tamper, message = TAMPERED[case]
    tamper(model_dir)
    with pytest.raises(CheckpointError) as info:
        load_pruned(model_dir)
    text = str(info.value)
    assert message in text
    assert "weights_only=False" not in text  # torch's advice to unpickle anyway is never passed on
    assert "\n" not in text.strip()
    assert not (model_dir / "PWNED").exists()  # nothing in the file was executed


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_directory_fails_eval_in_one_line(
    case: str, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper, message = TAMPERED[case]
    tamper(model_dir)
    assert cli.main(["eval", str(model_dir)]) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err)
    assert captured.out == ""  # nothing was scored


def test_the_untampered_model_loads_and_evaluates(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = read_spec(saved)
    assert spec["format"] == FORMAT == 2
    model = load_pruned(saved)
    import prune_env

    assert prune_env.count_macs(model, torch.zeros(1, *SHAPE)) == spec["macs"]
    assert prune_env.count_params(model) == spec["params"]
    assert cli.main(["eval", str(saved)]) == 0
    assert f"MACs:     {spec['macs']:,}" in capsys.readouterr().out


def test_a_description_of_another_format_is_refused_naming_the_fix(model_dir: Path) -> None:
    _edit_spec(lambda s: [s.pop("macs"), s.pop("params"), s.update(format=1)])(model_dir)
    with pytest.raises(CheckpointError, match="'format' must be 2, got 1; re-save the model"):
        read_spec(model_dir)


def test_validate_spec_is_the_schema_for_saving_too(tmp_path: Path) -> None:
    base = get_model("tiny", num_classes=10, in_channels=1).eval()
    with pytest.raises(InvalidSettingError, match="'input_shape'"):
        save_pruned(tmp_path / "m", base, keep={}, input_shape=(1, 0, 8), architecture="tiny",
                    num_classes=10, in_channels=1)  # fmt: skip
    with pytest.raises(InvalidSettingError, match="'num_classes'"):
        save_pruned(tmp_path / "m", base, keep={}, input_shape=SHAPE, architecture="tiny", num_classes=-2,
                    in_channels=1)  # fmt: skip
    assert not (tmp_path / "m").exists()  # refused before anything was written
    with pytest.raises(CheckpointError, match=r"somewhere\.json"):
        validate_spec({"format": 2}, "somewhere.json")


def test_resave_replaces_a_tampered_description(model_dir: Path, saved: Path) -> None:
    """Saving over a directory rewrites both files; a stale description never survives next to new
    weights."""
    _set("input_shape", [1, 512, 512])(model_dir)
    model = load_pruned(saved)
    spec = read_spec(saved)
    save_pruned(model_dir, model, keep=spec["keep"], input_shape=SHAPE, architecture="tiny", num_classes=10,
                in_channels=1)  # fmt: skip
    assert read_spec(model_dir)["input_shape"] == list(SHAPE)  # the tampered value is gone
    reloaded = load_pruned(model_dir)
    x = torch.randn(2, *SHAPE)
    assert torch.equal(reloaded(x), model(x))
