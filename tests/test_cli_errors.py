"""``prune-env`` eval / export / demo / list with bad input: one line, ``prune-env: error: ...``, exit 2, no
traceback, nothing done. A bug (any exception that is not the library's typed error) is not disguised as
bad input: it crashes with its traceback and a line asking to report it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_output import one_error_line
from torch import nn

import prune_env.checkpoint
from prune_env.app import cli
from prune_env.checkpoint import SPEC_FILE, save_pruned
from prune_env.device import available_devices, resolve_device
from prune_env.errors import InvalidSettingError
from prune_env.graph import build_graph
from prune_env.models import get_model
from prune_env.surgery import prune_channels


def _save_tiny(directory: Path, num_classes: int = 10, meta: dict[str, Any] | None = None) -> Path:
    torch.manual_seed(0)
    base = get_model("tiny", num_classes=num_classes, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, 1, 8, 8))
    keep = {g.name: list(range(0, g.units, 2)) for g in graph.groups}
    return save_pruned(directory, prune_channels(base, graph, keep), keep=keep, input_shape=(1, 8, 8),
                       architecture="tiny", num_classes=num_classes, in_channels=1,
                       meta={"dataset": "digits", "seed": 0} if meta is None else meta)  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("cli_errors") / "model")


@pytest.fixture(scope="module")
def saved_3_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("cli_errors") / "model3", num_classes=3)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ devices


def test_resolve_device_accepts_what_exists() -> None:
    assert resolve_device(None).type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert available_devices()[0] == "cpu"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("banana", "unknown device 'banana'; available devices: cpu"),
        ("", "device must be a name"),
        (3, "device must be a name"),
        ("cuda:x", "unknown device 'cuda:x'"),
        ("meta", "not available here"),
    ],
)
def test_resolve_device_refuses_unknown_devices(device: Any, message: str) -> None:
    with pytest.raises(InvalidSettingError, match=message.replace("(", r"\(")):
        resolve_device(device)


def test_resolve_device_refuses_cuda_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", torch.device("cuda:1")):
        with pytest.raises(InvalidSettingError, match=r"torch.cuda.is_available\(\) is False.*--device cpu"):
            resolve_device(name)


def test_resolve_device_refuses_a_gpu_index_past_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        InvalidSettingError, match=r"cuda:2 requested but this machine has 2 GPUs \(cuda:0 to"
    ):
        resolve_device("cuda:2")


# ------------------------------------------------------------------------------------------------ eval


def _meta_dataset(value: Any) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        spec = json.loads((d / SPEC_FILE).read_text())
        spec["meta"]["dataset"] = value
        (d / SPEC_FILE).write_text(json.dumps(spec))

    return tamper


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "banana"], "unknown device 'banana'"),
        (["--device", "cuda:99"], "cuda:99 requested"),
        (["--dataset", "fake"], "dataset fake has 3-channel inputs but the model at"),
        (["--dataset", "mnist3"], "unknown dataset 'mnist3'"),
        (["--dataset", "imagefolder:/nonexistent/dir"], "is not a directory"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got '-1'"),
        (["--seed", "1.5"], "argument --seed"),
        (["--split", "train"], "argument --split: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_eval_bad_arguments_fail_in_one_line(
    args: list[str], message: str, saved: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda" in message and torch.cuda.device_count() > 99:
        pytest.skip("this machine has that GPU")
    assert cli.main(["eval", str(saved), *args]) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize(
    "stored", ["imagefolder:/etc", "imagefolder:relative/dir", "/etc", "./data", "~/data", "..\\data"]
)
def test_eval_never_reads_a_path_from_the_models_description(
    stored: str,
    saved: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = Path(shutil.copytree(saved, tmp_path / "model"))
    _meta_dataset(stored)(model)

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dataset was loaded")

    monkeypatch.setattr("prune_env.data.load", no_loading)
    assert cli.main(["eval", str(model)]) == 2
    line = _one_error_line(capsys)
    assert "which is a path" in line and "--dataset" in line


@pytest.mark.parametrize("stored", [None, 7, "", ["digits"]])
def test_eval_asks_for_a_dataset_the_description_does_not_name(
    stored: Any, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Path(shutil.copytree(saved, tmp_path / "model"))
    _meta_dataset(stored)(model)
    assert cli.main(["eval", str(model)]) == 2
    assert "does not name its dataset; pass --dataset" in _one_error_line(capsys)


def test_eval_names_both_class_counts(saved_3_classes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", str(saved_3_classes), "--dataset", "digits"]) == 2
    assert "dataset digits has 10 classes but the model at" in _one_error_line(capsys)


class _DictOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x)}


class _TupleOutput(_DictOutput):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.inner(x), x


class _FewerClasses(_DictOutput):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.inner(x)[:, :4]


class _Flat(_DictOutput):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.inner(x).reshape(-1)


@pytest.mark.parametrize(
    ("wrapper", "message"),
    [
        (_DictOutput, "the model returns a dict, not a tensor of class scores"),
        (_TupleOutput, "the model returns a tuple, not a tensor of class scores"),
        (_FewerClasses, "the model scores 4 classes but its description says num_classes 10"),
        (_Flat, "the model returns shape [10] for a batch of 1"),
    ],
)
def test_eval_refuses_a_model_that_is_not_a_classifier_of_its_classes(
    wrapper: type[nn.Module],
    message: str,
    saved: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = prune_env.checkpoint.load_pruned_with_spec

    def load(*args: Any, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
        model, spec = real(*args, **kwargs)
        return wrapper(model).eval(), spec

    monkeypatch.setattr(prune_env.checkpoint, "load_pruned_with_spec", load)
    assert cli.main(["eval", str(saved)]) == 2
    assert message in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------------ export


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.onnx"
    os.mkfifo(path)
    return path


def _dir_with_content(tmp_path: Path) -> Path:
    d = tmp_path / "out.onnx"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    return d


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "model.onnx"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (_dir_with_content, "is a directory; pass the path of the file to write"),
        (lambda p: p, "is a directory"),
        (_fifo, "exists and is not a regular file"),
        (_under_a_file, "is a file, not a directory"),
        (lambda p: Path("/proc/self/no/such/model.onnx"), "cannot write --onnx"),
    ],
)
def test_export_bad_targets_fail_in_one_line(
    target: Callable[[Path], Path],
    message: str,
    saved: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("onnx")
    out = target(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["export", str(saved), "--onnx", str(out)]) == 2
    assert message in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
    if out.is_dir() and (out / "keep.txt").exists():
        assert (out / "keep.txt").read_text() == "mine"


def test_export_of_a_tampered_model_fails_in_one_line(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    model = Path(shutil.copytree(saved, tmp_path / "model"))
    (model / "model.pt").write_bytes(b"")
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(model), "--onnx", str(out)]) == 2
    assert "is empty" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_replaces_a_file_atomically(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    out.write_text("previous export")

    def broken_exporter(*args: Any, **kwargs: Any) -> None:
        args[2].write(b"half a fil")
        raise RuntimeError("exporter crashed halfway")

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    assert cli.main(["export", str(saved), "--onnx", str(out), "--force"]) == 1  # not the user's fault
    assert "exporter crashed halfway" in capsys.readouterr().err
    assert out.read_text() == "previous export"  # a failed export leaves the earlier file alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    monkeypatch.undo()
    assert cli.main(["export", str(saved), "--onnx", str(out), "--force"]) == 0
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ------------------------------------------------------------------------------------------------ demo


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "nan"], "argument --ratio: must be a fraction in [0, 1), got 'nan'"),
        (["--ratio", "-0.1"], "argument --ratio"),
        (["--ratio", "1"], "argument --ratio"),
        (["--ratio", "1.5"], "argument --ratio"),
        (["--ratio", "inf"], "argument --ratio"),
        (["--ratio", "half"], "argument --ratio"),
        (["--resolution", "0"], "argument --resolution: must be an integer in [1, 2048], got '0'"),
        (["--resolution", "-8"], "argument --resolution"),
        (["--resolution", "1.5"], "argument --resolution"),
        (["--resolution", "100000"], "argument --resolution"),
        (["--model", "resnet1000"], "unknown torchvision model 'resnet1000'"),
        (["--model", "squeezenet1_1", "--resolution", "8"], "squeezenet1_1 cannot run on 8x8 inputs"),
    ],
)
def test_demo_bad_arguments_fail_in_one_line(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import prune_env

    def no_pruning(*a: Any, **k: Any) -> None:
        raise AssertionError("pruning started")

    monkeypatch.setattr(prune_env, "build_graph", no_pruning)  # refused before any work
    assert cli.main(["demo", *args]) == 2
    assert message in _one_error_line(capsys)


def test_list_with_an_extra_argument_fails_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "extra"]) == 2
    assert "unrecognized arguments: extra" in _one_error_line(capsys)


def test_no_or_unknown_subcommand_fails_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "required: command" in _one_error_line(capsys)
    assert cli.main(["prune"]) == 2
    assert "invalid choice: 'prune'" in _one_error_line(capsys)


def test_help_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "search" in capsys.readouterr().out
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--resolution" in out and "--ratio" in out


# ------------------------------------------------------------------------------------------------ bugs


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), ValueError("bad"), KeyError("k")])
def test_a_bug_is_a_crash_not_bad_input(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the library's typed errors mean "your input is wrong"; a ValueError from a bug is not one."""

    def broken(args: Any) -> int:
        raise error

    monkeypatch.setattr(cli, "_list", broken)
    status = cli.main(["list"])
    assert status not in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert type(error).__name__ in err
    assert "this is a bug in prune_env" in err
    assert "please report it" in err
    assert "prune-env: error:" not in err


def test_console_script_reports_a_tampered_model_in_one_line(saved: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(saved, tmp_path / "model"))
    spec = json.loads((model / SPEC_FILE).read_text())
    spec["input_shape"] = [1, 512, 512]
    (model / SPEC_FILE).write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "prune_env", "eval", str(model)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prune-env: error: ") and "records" in lines[0]
    assert proc.stdout == ""
