"""Commands own what they write: ``apply`` and ``export`` check every output before any work, never overwrite
without ``--force``, never report a path saved that another process wrote; ``apply`` refuses a damaged run
state in one line; a full disk is one line naming the file and the space needed, with nothing lost; the
saved model's description and the search's final line tell the truth; a weights file of another dtype is
refused before any training.

Runs are tiny (random search, 2 evaluations, 96 validation samples) on the session's cached resnet20.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_output import one_error_line
from torch import nn

import prune_env.checkpoint
import prune_env.data
from prune_env import fileio
from prune_env.app import cli
from prune_env.checkpoint import SPEC_FILE, read_spec
from prune_env.models import get_model

TINY = ["--agent", "random", "--eval-samples", "96", "--no-progress"]
BUDGET_RANGE = ["--budget-range", "0.3", "0.7", "--target-macs", "0.5"]


def _search(out: Path, *extra: str) -> int:
    return cli.main(["search", *TINY, "--out", str(out), *extra])


def _last_error_line(stderr: str) -> str:
    """A search logs to stderr before it fails: its last line is the error, and no traceback is shown."""
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("prune-env: error: "), stderr
    return line


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".old", ".probe"))]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the run's log excepted: a failed command may add a line to it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "log.txt"}  # fmt: skip


@pytest.fixture(scope="module")
def range_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, digits_base: Any) -> Path:
    """A finished budget-range search (random agent: its policy is the best allocation, carried over)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNE_ENV_CACHE", str(shared_cache))
        assert _search(out, *BUDGET_RANGE, "--evals", "3", "--finetune-epochs", "0") == 0
    return out


@pytest.fixture
def run(range_run: Path, tmp_path: Path, cached: Path) -> Path:
    """A copy of the budget-range run this test may damage."""
    return Path(shutil.copytree(range_run, tmp_path / "run"))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading data is the first piece of work: a refusal must come before it."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail("data was loaded before the input was refused")

    monkeypatch.setattr(prune_env.data, "load", refuse)


# ------------------------------------------------------------------------------------------------ apply


def _edit_settings(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is _DROP:
                del state["settings"][key]
            else:
                state["settings"][key] = value

    return edit


_DROP = object()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage {", "state.json is not readable JSON"),
        (b"\xff\xfe\x00", "state.json is not readable JSON"),
        ("[1, 2]", "is not a prune-env run state"),
        (_edit_settings(model=_DROP), "state.json: the settings lack model"),
        (_edit_settings(dataset=_DROP, image_size=_DROP), "the settings lack dataset, image_size"),
        (_edit_settings(budget_range=_DROP), "the settings lack budget_range"),
        (_edit_settings(max_ratio=_DROP), "the settings lack max_ratio"),
        (_edit_settings(budget_range=[0.9, 0.1]), "budget_range must be a pair (low, high) with low <= high"),
        (_edit_settings(budget_range=["a", 1]), "budget_range must be a real number, got 'a'"),
        (_edit_settings(budget_range=[0.3, 1.5]), "budget_range must be a fraction in (0, 1]"),
        (_edit_settings(budget_range=0.5), "budget_range must be a pair"),
        (_edit_settings(model=5), "model must be a name, got 5"),
        (_edit_settings(dataset=""), "dataset must be a name"),
        (_edit_settings(dataset="imagenet-2030"), "unknown dataset 'imagenet-2030'"),
        (_edit_settings(model="resnet9000"), "unknown model 'resnet9000'"),
        (_edit_settings(image_size="32"), "image_size must be an integer"),
        (_edit_settings(image_size=0), "image_size must be an integer >= 1"),
        (_edit_settings(weights=7), "weights must be a file path or null"),
        (_edit_settings(seed=-1), "seed must be an integer >= 0"),
        (_edit_settings(max_ratio="0.8"), "max_ratio must be a real number"),
        (_edit_settings(proxy="magic"), "proxy must be one of"),
        (_edit_settings(target_macs=None, target_params=0.5, target_bitops=0.5), "give one budget"),
    ],
)
def test_apply_refuses_a_damaged_state_file_before_any_work(
    run: Path, damage: Any, message: str, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    state_file = run / "state.json"
    if callable(damage):
        state = json.loads(state_file.read_text())
        damage(state)
        state_file.write_text(json.dumps(state))
    elif isinstance(damage, bytes):
        state_file.write_bytes(damage)
    else:
        state_file.write_text(damage)
    assert cli.main(["apply", str(run), "--target", "0.4", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(state_file) in line and message in line, line
    assert not (run / "applied").exists()


def _file(run: Path) -> Path:
    (run / "a-file").write_text("mine")
    return run / "a-file"


def _under_a_file(run: Path) -> Path:
    return _file(run) / "model"


def _saved_model(run: Path) -> Path:
    return Path(shutil.copytree(run / "model", run.parent / "existing"))


def _users_directory(run: Path) -> Path:
    directory = _saved_model(run)
    (directory / "notes.txt").write_text("mine")
    return directory


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        (_file, [], "is a file, not a directory"),
        (_file, ["--force"], "is a file, not a directory"),
        (_under_a_file, [], "is a file, not a directory"),
        (lambda run: Path("/proc/self/no/such/model"), [], "cannot write --out /proc/self/no/such/model"),
        (_saved_model, [], "exists; pass --force to replace the model in it"),
        (_users_directory, ["--force"], "holding other files than a saved model; nothing in it is replaced"),
        (lambda run: run, ["--force"], "holding other files than a saved model"),
        (lambda run: run / "policy", ["--force"], "holding other files than a saved model"),
        (lambda run: Path(" "), [], "--out is empty"),
    ],
)
def test_apply_checks_its_output_before_any_work(
    run: Path,
    target: Callable[[Path], Path],
    extra: list[str],
    message: str,
    no_work: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = target(run)
    before = _tree(run.parent)
    assert cli.main(["apply", str(run), "--target", "0.4", "--out", str(out), *extra, "--no-progress"]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert _tree(run.parent) == before  # nothing written, nothing replaced
    assert _temporaries(run.parent) == []


def test_apply_replaces_a_saved_model_only_with_force(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run / "applied" / "macs-0.4"
    assert cli.main(["apply", str(run), "--target", "0.4", "--no-progress"]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    first = _tree(out)
    assert read_spec(out)["meta"]["finetuned"] is False
    assert cli.main(["apply", str(run), "--target", "0.4", "--no-progress"]) == 2
    assert "exists; pass --force" in one_error_line(capsys.readouterr().err)
    assert _tree(out) == first
    assert cli.main(["apply", str(run), "--target", "0.4", "--no-progress", "--force",
                     "--finetune-epochs", "1"]) == 0  # fmt: skip
    assert read_spec(out)["meta"]["finetuned"] is True  # fine-tuning ran: the description says so
    assert _temporaries(run) == []
    prune_env.load_pruned(out)


def test_two_applies_to_one_out_never_both_save(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """While this apply works, another process saves its model at --out: this one must not report saving
    there, and the other's model stays as it is."""
    out = run.parent / "shared"
    real_save = prune_env.checkpoint.save_pruned

    def other_process_finishes_first(path: Any, *args: Any, **kwargs: Any) -> Path:
        if not out.exists():
            shutil.copytree(run / "model", out)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(prune_env.checkpoint, "save_pruned", other_process_finishes_first)
    assert cli.main(["apply", str(run), "--target", "0.4", "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "saved to" not in captured.out
    assert "was created by another process while this one ran" in one_error_line(captured.err)
    assert _tree(out) == _tree(run / "model")
    assert _temporaries(run.parent) == []


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prune_env.graph import build_graph
    from prune_env.surgery import prune_channels

    torch.manual_seed(0)
    base = get_model("tiny", num_classes=10, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, 1, 8, 8))
    keep = {g.name: list(range(0, g.units, 2)) for g in graph.groups}
    return prune_env.checkpoint.save_pruned(
        tmp_path_factory.mktemp("export") / "model", prune_channels(base, graph, keep), keep=keep,
        input_shape=(1, 8, 8), architecture="tiny", num_classes=10, in_channels=1,
        meta={"dataset": "digits", "seed": 0},
    )  # fmt: skip


def _link(tmp_path: Path) -> Path:
    (tmp_path / "link").symlink_to(tmp_path)
    return tmp_path / "link" / "x.pt"


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            lambda d, m: ["--torchscript", str(d / "x.pt"), "--onnx", str(d / "x.pt")],
            "is the file --onnx writes",
        ),
        (lambda d, m: ["--torchscript", str(d / "x.pt"), "--onnx", f"{d}/sub/../x.pt"], "is the file --onnx"),
        (lambda d, m: ["--torchscript", str(d / "x.pt"), "--onnx", str(_link(d))], "is the file --onnx"),
        (lambda d, m: ["--torchscript", str(m / "model.pt"), "--force"], "is a file of the model being read"),
        (lambda d, m: ["--onnx", str(m / SPEC_FILE), "--force"], "is a file of the model being read"),
        (lambda d, m: ["--torchscript", str(d / "old.pt")], "exists; pass --force to replace it"),
        (
            lambda d, m: ["--torchscript", str(d / "ok.pt"), "--onnx", str(d / "old.pt")],
            "exists; pass --force",
        ),
        (lambda d, m: ["--torchscript", " "], "--torchscript is empty"),
    ],
)
def test_export_checks_its_outputs_before_any_work(
    model_dir: Path,
    tmp_path: Path,
    outputs: Callable[[Path, Path], list[str]],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("onnx")
    (tmp_path / "sub").mkdir()
    (tmp_path / "old.pt").write_text("previous")
    args = outputs(tmp_path, model_dir)
    before, model_before = _tree(tmp_path), _tree(model_dir)
    monkeypatch.setattr(prune_env.checkpoint, "load_pruned_with_spec", lambda *a: pytest.fail("loaded"))
    assert cli.main(["export", str(model_dir), *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert _tree(tmp_path) == before and _tree(model_dir) == model_before
    assert _temporaries(tmp_path) == []


def test_export_never_overwrites_a_file_that_appears_while_it_works(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prune_env.app import model_commands

    out = tmp_path / "m.pt"
    real = model_commands._torchscript_bytes

    def another_process_writes_first(*args: Any) -> Any:
        out.write_text("the other process's export")
        return real(*args)

    monkeypatch.setattr(model_commands, "_torchscript_bytes", another_process_writes_first)
    assert cli.main(["export", str(model_dir), "--torchscript", str(out)]) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert "was created by another process" in one_error_line(captured.err)
    assert out.read_text() == "the other process's export"
    assert _temporaries(tmp_path) == []


def test_export_with_force_replaces_a_file(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.pt"
    out.write_text("previous")
    assert cli.main(["export", str(model_dir), "--torchscript", str(out), "--force"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert torch.jit.load(str(out)) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ------------------------------------------------------------------------------------------------ full disk


def _full_disk_on(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writing a file named ``name`` (or a temporary file for it) fails as a full disk does."""
    real = fileio._write_all

    def write(file: Any, data: Any) -> None:
        written = os.readlink(f"/proc/self/fd/{file.fileno()}")
        base = os.path.basename(written)
        if base == name or base.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(file, data)

    monkeypatch.setattr(fileio, "_write_all", write)


def _disk_full_search(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    _full_disk_on(monkeypatch, "model.pt")
    return ["search", *TINY, "--out", str(tmp_path / "new"), "--evals", "2", "--finetune-epochs", "0"]


def _disk_full_resume(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    plain = tmp_path / "plain"
    assert _search(plain, "--evals", "2", "--finetune-epochs", "0") == 0
    _full_disk_on(monkeypatch, "state.json")
    return ["search", *TINY, "--out", str(plain), "--evals", "3", "--finetune-epochs", "0", "--resume"]


def _disk_full_export(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    out = tmp_path / "exports"
    out.mkdir()
    (out / "m.pt").write_text("previous export")
    _full_disk_on(monkeypatch, "m.pt")
    return ["export", str(run / "model"), "--torchscript", str(out / "m.pt"), "--force"]


def _disk_full_apply(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    out = Path(shutil.copytree(run / "model", tmp_path / "applied"))
    _full_disk_on(monkeypatch, "model.pt")
    return ["apply", str(run), "--target", "0.4", "--out", str(out), "--force", "--no-progress"]


@pytest.mark.parametrize(
    ("command", "written"),
    [
        (_disk_full_search, "model.pt"),
        (_disk_full_resume, "state.json"),
        (_disk_full_export, "m.pt"),
        (_disk_full_apply, "model.pt"),
    ],
    ids=["search", "resume", "export", "apply"],
)
def test_a_full_disk_is_one_line_and_loses_nothing(
    run: Path,
    tmp_path: Path,
    command: Callable[..., list[str]],
    written: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with monkeypatch.context() as mp:
        argv = command(run, tmp_path, mp)
        before = _tree(tmp_path)
        capsys.readouterr()
        assert cli.main(argv) == 2
        line = _last_error_line(capsys.readouterr().err)
    assert "no space left on the device: cannot write" in line and written in line, line
    assert ".tmp" not in line  # the path asked for, not a temporary one
    assert "bytes needed" in line or "KiB needed" in line, line
    after = _tree(tmp_path)
    # Nothing that was there is changed or lost; what the failed command added is complete or absent.
    assert set(before) <= set(after)
    assert {k: after[k] for k in before} == before
    assert _temporaries(tmp_path) == []
    for weights in tmp_path.rglob("model.pt"):
        assert (weights.parent / SPEC_FILE).exists()  # never weights without their description


def test_a_full_disk_message_names_the_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    _full_disk_on(monkeypatch, "big.bin")
    with pytest.raises(prune_env.errors.DiskFullError, match=r"cannot write .*big\.bin \(2\.0 MiB needed, "):
        fileio.write_bytes_atomic(target, b"x" * 2 * 2**20)
    assert target.read_bytes() == b"old"
    assert _temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------ truthful


def test_a_model_saved_without_fine_tuning_says_so(
    cached: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _search(out, "--evals", "2", "--finetune-epochs", "0") == 0
    assert read_spec(out / "model")["meta"]["finetuned"] is False
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("not fine-tuned (--finetune-epochs 0): test accuracy"), last


def test_a_budget_range_search_reports_the_saved_models_costs(cached: Path, tmp_path: Path) -> None:
    """The saved model is the policy applied at the target, not the best episode (drawn at another target
    of the range): results.json and the final line give the costs of the model on disk."""
    range_run = tmp_path / "run"
    args = ["--agent", "ppo", *BUDGET_RANGE, "--evals", "4", "--finetune-epochs", "0"]
    assert cli.main(["search", "--eval-samples", "96", "--no-progress", "--out", str(range_run), *args]) == 0
    results = json.loads((range_run / "results.json").read_text())
    spec = read_spec(range_run / "model")
    macs_ratio = spec["macs"] / results["base_macs"]
    assert results["macs_ratio"] == pytest.approx(macs_ratio)
    assert results["macs_ratio"] <= 0.5 + 1e-9
    best = json.loads((range_run / "results.json").read_text())["best_evaluation"]
    rows = (range_run / "evaluations.csv").read_text().splitlines()
    header = rows[0].split(",")
    best_macs = float(rows[1 + best].split(",")[header.index("macs_ratio")])
    assert f"{best_macs:.3f}" != f"{macs_ratio:.3f}"  # the two differ: the line must pick the right one
    last = (range_run / "log.txt").read_text().strip().splitlines()[-1]
    assert f"macs ratio {macs_ratio:.3f}," in last, last


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (torch.float16, "as float16"),
        (torch.float64, "as float64"),
        (torch.int32, "as int32"),
        (torch.bfloat16, "as bfloat16"),
    ],
)
def test_search_refuses_weights_of_another_dtype(
    dtype: torch.dtype, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from prune_env import train

    state = get_model("resnet20", 10, 1).state_dict()
    weights = tmp_path / "w.pt"
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, weights)
    monkeypatch.setenv("PRUNE_ENV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train, "_fit", lambda *a, **k: pytest.fail("trained before refusing the weights"))
    assert _search(tmp_path / "run", "--weights", str(weights), "--evals", "2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--weights {weights} holds" in line and message in line and "where the model has float32" in line
    assert "convert them first" in line
    assert not (tmp_path / "run").exists()


def test_load_weights_keeps_the_models_dtype(tmp_path: Path) -> None:
    from prune_env.app.weights import load_weights

    model: nn.Module = get_model("tiny", 10, 1)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    assert load_weights(get_model("tiny", 10, 1), weights).state_dict().keys() == model.state_dict().keys()
