"""One process owns an output while it writes it: ``apply``'s model directory and every ``export`` file.

Two commands writing one path, ``--force`` or not, never both report it saved: the second is refused at
once, naming the path and the process writing it, and the first one's result is what the path holds. A
writer that takes no lock and replaces the output while a command works keeps its output too. An output
named by a symbolic link is refused before any work, naming the link and the real path.

Races are made deterministic: the first command is held inside its work (or another process holds the
lock) while the second one runs. Runs are tiny (random search, 3 evaluations) on the session's resnet20;
exports use two tiny pruned models.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_output import one_error_line

import prune_env.checkpoint
import prune_env.data
from prune_env.app import cli, model_commands
from prune_env.app.outputs import OutputLock, lock_path, owning
from prune_env.app.rundir import LOCK_FILE
from prune_env.checkpoint import read_spec
from prune_env.errors import InvalidSettingError
from prune_env.models import get_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--agent", "random", "--eval-samples", "96", "--no-progress"]
WAIT = 120  # seconds a held step waits for the test to let it go: a hang fails instead of blocking CI

# Another process taking an output's lock the way prune-env does, until a line arrives on its stdin.
HOLDER = """
import sys
from pathlib import Path
from prune_env.app.outputs import OutputLock
lock = OutputLock(Path(sys.argv[1]), "--out")
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    """Temporary, set-aside, probe and output lock files: none may remain once a command has ended (a
    run directory's own lock file stays, as it always has)."""
    return sorted(
        p.name
        for p in root.rglob(".*")
        if p.name.endswith((".tmp", ".old", ".probe", ".lock")) and p.name != LOCK_FILE
    )


@pytest.fixture
def holder() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Start another process holding the lock of an output; it lets go when the test ends."""
    started: list[subprocess.Popen[str]] = []

    def hold(out: Path) -> subprocess.Popen[str]:
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        started.append(process)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in started:
        if process.poll() is None:
            process.communicate("\n", timeout=WAIT)


class _Paused:
    """Make ``owner.name`` stop, in the thread that runs :meth:`first` only, until :meth:`go` (the other
    command runs meanwhile in the test's thread, where it is never held)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.working, self.released = threading.Event(), threading.Event()
        self.result: list[int] = []
        self.thread: threading.Thread | None = None
        real = getattr(owner, name)

        def paused(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is self.thread:
                self.working.set()
                assert self.released.wait(WAIT), "the test never let the first command go"
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, paused)

    def first(self, argv: list[str]) -> None:
        self.thread = threading.Thread(target=lambda: self.result.append(cli.main(argv)))
        self.thread.start()
        assert self.working.wait(WAIT), "the first command never reached the held step"

    def go(self) -> int:
        assert self.thread is not None
        self.released.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.result[0]


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any, str], _Paused]]:
    """:class:`_Paused` steps, each let go when the test ends, even if it failed before :meth:`_Paused.go`."""
    made: list[_Paused] = []

    def pause(owner: Any, name: str) -> _Paused:
        made.append(_Paused(monkeypatch, owner, name))
        return made[-1]

    yield pause
    for step in made:
        step.released.set()
        if step.thread is not None:
            step.thread.join(WAIT)


# ------------------------------------------------------------------------------------------------ the lock


def test_a_held_output_is_refused_naming_the_holder_and_no_lock_file_remains(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with OutputLock(out, "--out"):
        assert lock_path(out).exists()
        with pytest.raises(InvalidSettingError) as refused:
            OutputLock(out, "--out").acquire()
        message = str(refused.value)
        assert message.startswith(f"--out {out} is being written by process {os.getpid()} on "), message
        assert f"on {socket.gethostname()} (since " in message
        assert message.endswith("); nothing was done: wait for it to finish, or pass another --out")
    assert list(tmp_path.iterdir()) == []
    with OutputLock(out, "--out"):  # free again
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_removed_while_waiting_to_lock_it_is_not_held(tmp_path: Path) -> None:
    """B opens the lock file, then A (the holder) removes it and lets go, then B locks the removed file:
    B must take the lock on the file the name leads to now, or a third process C could hold it too."""
    out = tmp_path / "model.pt"
    a, b = OutputLock(out, "--torchscript"), OutputLock(out, "--torchscript")
    a.acquire()
    real_open = b._open

    def open_then_holder_lets_go() -> int:
        fd = real_open()
        a.release()
        return fd

    b._open = open_then_holder_lets_go  # type: ignore[method-assign]
    b.acquire()
    b._open = real_open  # type: ignore[method-assign]
    with pytest.raises(InvalidSettingError, match="is being written by process"):
        OutputLock(out, "--torchscript").acquire()
    b.release()
    assert list(tmp_path.iterdir()) == []


def test_threads_never_hold_one_output_together(tmp_path: Path) -> None:
    out = tmp_path / "model"
    inside, overlaps, taken = [0], [0], [0]
    counter = threading.Lock()

    def work() -> None:
        for _ in range(300):
            lock = OutputLock(out, "--out")
            try:
                lock.acquire()
            except InvalidSettingError:
                continue
            with counter:
                inside[0] += 1
                overlaps[0] += inside[0] > 1
                taken[0] += 1
            time.sleep(0.0002)  # hold it a moment, as a writer does
            with counter:
                inside[0] -= 1
            lock.release()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert overlaps[0] == 0
    assert taken[0] > 0
    assert list(tmp_path.iterdir()) == []


def test_owning_checks_again_under_the_lock(tmp_path: Path) -> None:
    """What another process finished between the first check and the lock is refused before any work."""
    out = tmp_path / "m.pt"

    def check() -> None:
        if out.exists():
            raise InvalidSettingError("exists")

    out.write_text("finished meanwhile")
    with pytest.raises(InvalidSettingError, match="exists"), owning([(out, "--torchscript")], check):
        pytest.fail("the block ran although the check refused")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# ------------------------------------------------------------------------------------------------ apply


@pytest.fixture(scope="module")
def range_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, digits_base: Any) -> Path:
    """A finished budget-range search (random agent: its policy is the best allocation, carried over)."""
    out = tmp_path_factory.mktemp("ownership") / "run"
    argv = ["search", *TINY, "--out", str(out), "--budget-range", "0.3", "0.7", "--target-macs", "0.5",
            "--evals", "3", "--finetune-epochs", "0"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNE_ENV_CACHE", str(shared_cache))
        assert cli.main(argv) == 0
    return out


@pytest.fixture
def run(range_run: Path, tmp_path: Path, cached: Path) -> Path:
    return Path(shutil.copytree(range_run, tmp_path / "run"))


def _apply(run: Path, target: str, out: Path, *extra: str) -> list[str]:
    return ["apply", str(run), "--target", target, "--out", str(out), "--no-progress", *extra]


def _loads_in(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads that loaded data (the first piece of an apply's work)."""
    loaders: list[threading.Thread] = []
    real = prune_env.data.load

    def load(*args: Any, **kwargs: Any) -> Any:
        loaders.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_env.data, "load", load)
    return loaders


def test_two_forced_applies_to_one_out_one_saves_the_other_is_refused_at_once(
    run: Path, paused: Callable[[Any, str], _Paused], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = Path(shutil.copytree(run / "model", run.parent / "shared"))  # a model is there: --force needed
    loaders = _loads_in(monkeypatch)
    first = paused(prune_env.checkpoint, "save_pruned")
    first.first(_apply(run, "0.5", out, "--force"))
    assert cli.main(_apply(run, "0.4", out, "--force")) == 2
    refused = capsys.readouterr()
    line = one_error_line(refused.err)
    assert f"--out {out} is being written by process {os.getpid()}" in line, line
    assert "wait for it to finish, or pass another --out" in line
    assert "saved to" not in refused.out
    assert threading.current_thread() not in loaders  # refused before any work
    assert first.go() == 0
    assert f"saved to {out}" in capsys.readouterr().out
    assert read_spec(out)["meta"]["target"] == 0.5  # the first one's model, whole
    prune_env.load_pruned(out)
    assert _leftovers(run.parent) == []


def test_apply_to_an_out_another_process_writes_is_refused_before_any_work(
    run: Path, holder: Callable[[Path], subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = Path(shutil.copytree(run / "model", run.parent / "shared"))
    before = _tree(out)
    other = holder(out)
    monkeypatch.setattr(prune_env.data, "load", lambda *a, **k: pytest.fail("data loaded before refusing"))
    assert cli.main(_apply(run, "0.4", out, "--force")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out {out} is being written by process {other.pid} on " in line, line
    assert _tree(out) == before
    assert lock_path(out).exists()  # the holder's, left alone


def test_forced_apply_keeps_a_model_another_writer_put_there_meanwhile(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer that takes no lock (a copy, an older prune-env) replaces --out while apply works: --force
    replaces the model apply checked, never one it has not seen."""
    out = Path(shutil.copytree(run / "model", run.parent / "shared"))
    real = prune_env.checkpoint.save_pruned

    def replaced_meanwhile(path: Any, *args: Any, **kwargs: Any) -> Path:
        shutil.rmtree(out)
        shutil.copytree(run / "model", out)
        (out / "model.json").write_text((out / "model.json").read_text().replace('"seed"', '"seed" '))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prune_env.checkpoint, "save_pruned", replaced_meanwhile)
    assert cli.main(_apply(run, "0.4", out, "--force")) == 2
    captured = capsys.readouterr()
    assert "saved to" not in captured.out
    line = one_error_line(captured.err)
    assert line.endswith(
        f"--out {out} was replaced by another process while this one ran; it was left as it is and this "
        "result was not saved: pass another --out, or run this command again to replace it"
    ), line
    assert '"seed" ' in (out / "model.json").read_text()  # the other writer's model, as it left it
    assert _leftovers(run.parent) == []


def _link_to_empty(tmp: Path) -> tuple[Path, Path]:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    return tmp / "link", tmp / "real"


def _link_to_model(tmp: Path) -> tuple[Path, Path]:
    real = Path(shutil.copytree(tmp / "run" / "model", tmp / "real"))
    (tmp / "link").symlink_to(real)
    return tmp / "link", real


def _dangling(tmp: Path) -> tuple[Path, Path]:
    (tmp / "link").symlink_to(tmp / "real")
    return tmp / "link", tmp / "real"


@pytest.mark.parametrize("make", [_link_to_empty, _link_to_model, _dangling])
def test_apply_refuses_an_out_that_is_a_symbolic_link_before_any_work(
    run: Path, make: Callable[[Path], tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    link, real = make(run.parent)
    before = _tree(run.parent)
    with monkeypatch.context() as mp:
        mp.setattr(prune_env.data, "load", lambda *a, **k: pytest.fail("data loaded before refusing"))
        assert cli.main(_apply(run, "0.4", link, "--force")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"prune-env: error: --out {link} is a symbolic link (to {real}); outputs are never written through "
        f"a link: pass the real path (--out {real}) or remove the link"
    )
    assert link.is_symlink() and _tree(run.parent) == before
    assert _leftovers(run.parent) == []
    if make is _link_to_empty:  # the path the message gives is one apply writes
        assert cli.main(_apply(run, "0.4", real)) == 0
        assert read_spec(real)["meta"]["target"] == 0.4
        assert _leftovers(run.parent) == []


# ------------------------------------------------------------------------------------------------ export


def _tiny_model(root: Path, seed: int) -> Path:
    from prune_env.graph import build_graph
    from prune_env.surgery import prune_channels

    torch.manual_seed(seed)
    base = get_model("tiny", num_classes=10, in_channels=1).eval()
    graph = build_graph(base, torch.zeros(1, 1, 8, 8))
    keep = {g.name: list(range(0, g.units, 2)) for g in graph.groups}
    return prune_env.checkpoint.save_pruned(
        root / f"model-{seed}", prune_channels(base, graph, keep), keep=keep, input_shape=(1, 8, 8),
        architecture="tiny", num_classes=10, in_channels=1, meta={"dataset": "digits", "seed": 0},
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two saved models whose outputs differ: which one an exported file holds can be told."""
    root = tmp_path_factory.mktemp("models")
    return _tiny_model(root, 0), _tiny_model(root, 1)


def _exported_from(path: Path, models: tuple[Path, Path]) -> int:
    """Which of ``models`` the TorchScript file at ``path`` computes."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = torch.jit.load(str(path))(x)
        matches = [i for i, m in enumerate(models) if torch.allclose(prune_env.load_pruned(m)(x), got)]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_two_forced_exports_to_one_file_one_writes_the_other_is_refused_at_once(
    models: tuple[Path, Path], tmp_path: Path, paused: Callable[[Any, str], _Paused],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "model.pt"
    out.write_text("an earlier export")
    first = paused(model_commands, "_torchscript_bytes")
    first.first(["export", str(models[0]), "--torchscript", str(out), "--force"])
    with monkeypatch.context() as mp:
        mp.setattr(prune_env.checkpoint, "load_pruned_with_spec", lambda *a: pytest.fail("loaded"))
        assert cli.main(["export", str(models[1]), "--torchscript", str(out), "--force"]) == 2
    refused = capsys.readouterr()
    assert "wrote" not in refused.out
    line = one_error_line(refused.err)
    assert f"--torchscript {out} is being written by process {os.getpid()}" in line, line
    assert out.read_text() == "an earlier export"  # nothing written yet: the first is still at work
    assert first.go() == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert _exported_from(out, models) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_export_with_an_output_another_process_writes_writes_none(
    models: tuple[Path, Path], tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    onnx, script = tmp_path / "m.onnx", tmp_path / "m.pt"
    other = holder(script)
    argv = ["export", str(models[0]), "--onnx", str(onnx), "--torchscript", str(script), "--force"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--torchscript {script} is being written by process {other.pid} on " in line, line
    assert not onnx.exists() and not script.exists()
    assert not lock_path(onnx).exists()  # the one it took is gone again


def test_a_lock_a_killed_process_left_is_taken_over(
    models: tuple[Path, Path], tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "m.pt"
    other = holder(out)
    assert cli.main(["export", str(models[0]), "--torchscript", str(out)]) == 2
    other.send_signal(signal.SIGKILL)
    other.wait(WAIT)
    assert lock_path(out).exists()  # left behind: the kernel let go of the lock, not of the file
    capsys.readouterr()
    assert cli.main(["export", str(models[0]), "--torchscript", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_forced_export_keeps_a_file_another_writer_changed_meanwhile(
    how: str, models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "m.pt"
    out.write_text("an earlier export")
    real = model_commands._torchscript_bytes

    def changed_meanwhile(*args: Any) -> Any:
        if how == "replaced":
            (tmp_path / "other").write_text("the other writer's export")
            os.replace(tmp_path / "other", out)
        else:
            with open(out, "a") as f:
                f.write(", then the other writer's")
        return real(*args)

    monkeypatch.setattr(model_commands, "_torchscript_bytes", changed_meanwhile)
    expected = (
        "the other writer's export" if how == "replaced" else "an earlier export, then the other writer's"
    )
    assert cli.main(["export", str(models[0]), "--torchscript", str(out), "--force"]) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    line = one_error_line(captured.err)
    assert f"--torchscript {out} was replaced by another process while this one ran" in line, line
    assert line.endswith("pass another --torchscript, or run this command again to replace it"), line
    assert out.read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def _link_to_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "real.pt").write_text("mine")
    (tmp / "link.pt").symlink_to(tmp / "real.pt")
    return tmp / "link.pt", tmp / "real.pt"


def _dangling_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "link.pt").symlink_to(tmp / "real.pt")
    return tmp / "link.pt", tmp / "real.pt"


@pytest.mark.parametrize("make", [_link_to_file, _dangling_file])
def test_export_refuses_an_output_that_is_a_symbolic_link_before_any_work(
    make: Callable[[Path], tuple[Path, Path]], models: tuple[Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    link, real = make(tmp_path)
    before = _tree(tmp_path)
    monkeypatch.setattr(prune_env.checkpoint, "load_pruned_with_spec", lambda *a: pytest.fail("loaded"))
    assert cli.main(["export", str(models[0]), "--torchscript", str(link), "--force"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"prune-env: error: --torchscript {link} is a symbolic link (to {real}); outputs are never written "
        f"through a link: pass the real path (--torchscript {real}) or remove the link"
    )
    assert link.is_symlink() and _tree(tmp_path) == before
    assert _leftovers(tmp_path) == []


def test_export_to_a_link_to_a_directory_names_a_file_in_it(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "exports").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "exports")
    link = tmp_path / "link"
    assert cli.main(["export", str(models[0]), "--torchscript", str(link)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        f"--torchscript {link} is a directory; pass the path of the file to write, e.g. {link / 'model.pt'}"
        in line
    )
    assert cli.main(["export", str(models[0]), "--torchscript", str(link / "model.pt")]) == 0  # as it says
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["model.pt"]
