"""Run directories and resume: one owner per directory, forged logs refused, files never destroyed.

Runs are tiny (random or evolution search, a few evaluations, 96 validation samples, no fine-tune) on the
session's cached digits resnet20.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_output import one_error_line
from torch import nn

from prune_env.app import cli, runfiles
from prune_env.app.rundir import OWNER_FILE, RunDirectory
from prune_env.checkpoint import load_pruned
from prune_env.data import Splits
from prune_env.errors import RunDirectoryError
from prune_env.proxy import ProxyEvaluator

TINY = ["--agent", "random", "--eval-samples", "96", "--no-progress", "--finetune-epochs", "0"]


def _search(out: Path, *extra: str) -> int:
    return cli.main(["search", *TINY, "--out", str(out), *extra])


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "evaluations.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def two_evals(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, digits_base: tuple[nn.Module, dict]
) -> Path:
    """A finished 2-evaluation run, copied by each test that tampers with it."""
    out = tmp_path_factory.mktemp("resume") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNE_ENV_CACHE", str(shared_cache))
        assert _search(out, "--evals", "2") == 0
    return out


# ------------------------------------------------------------------------------------------------ owners


_HOLD = """
import sys, time
from pathlib import Path
from prune_env.app import cli, runfiles

flag = Path(sys.argv[1])
record = runfiles.RunLog.__call__

def record_then_hold(self, entry):
    record(self, entry)
    flag.write_text("evaluated")
    time.sleep(600)  # holds the run directory until the test kills it

runfiles.RunLog.__call__ = record_then_hold
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_second_process_on_the_same_out_is_refused(cached: Path, tmp_path: Path) -> None:
    out, flag = tmp_path / "run", tmp_path / "flag"
    env = {**os.environ, "PRUNE_ENV_CACHE": str(cached), "OMP_NUM_THREADS": "1"}
    args = ["search", *TINY, "--evals", "3", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(flag), *args], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
            assert time.monotonic() < deadline, "the first run never evaluated"
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, "-m", "prune_env", *args, "--seed", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"is in use by process {first.pid} on " in lines[0]
        assert "Traceback" not in second.stderr
        resumed = subprocess.run(
            [sys.executable, "-m", "prune_env", *args, "--resume"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 2  # resuming is refused too while the owner runs
        assert f"process {first.pid}" in resumed.stderr
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock; no stale lock is left behind
        first.wait()
    assert [r["index"] for r in _rows(out)] == ["0"]  # nothing of the second process interleaved
    assert _search(out, "--evals", "3", "--resume") == 0
    assert [r["index"] for r in _rows(out)] == ["0", "1", "2"]
    assert not (out / OWNER_FILE).exists()


def test_the_lock_is_held_within_one_process_too(tmp_path: Path) -> None:
    with (
        RunDirectory(tmp_path / "d", run_files=(), resume=True),
        pytest.raises(RunDirectoryError, match=f"in use by process {os.getpid()}"),
    ):
        RunDirectory(tmp_path / "d", run_files=(), resume=True).open()
    with RunDirectory(tmp_path / "d", run_files=(), resume=True) as again:  # released on exit
        assert again.is_open


@pytest.mark.parametrize("name", ["evaluations.csv", "results.json", "model", "log.txt"])
def test_a_directory_with_any_run_file_is_refused_without_resume(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    target = out / name
    target.mkdir() if "." not in name else target.write_text("mine\n")
    before = sorted(p.name for p in out.iterdir())
    assert _search(out, "--evals", "2") == 2
    assert "already holds a run" in _one_error_line(capsys)
    assert _search(out, "--evals", "2", "--resume") == 2
    assert "nothing to resume" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == before
    if target.is_file():
        assert target.read_text() == "mine\n"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("a file"), "is a file, not a directory"),
        (lambda p: None, "--out is empty"),
    ],
)
def test_unusable_out_paths(
    make: Callable[[Path], None], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    make(out)
    assert cli.main(["search", *TINY, "--out", str(out) if out.exists() else "", "--evals", "2"]) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert _search(parent / "run", "--evals", "2") == 2
        assert "choose a writable --out" in _one_error_line(capsys)
    finally:
        parent.chmod(0o700)


# ------------------------------------------------------------------------------------------------ forgeries


def _append_row(run: Path, **values: str) -> None:
    rows = _rows(run)
    row = {**rows[-1], "index": str(len(rows)), **values}
    with (run / "evaluations.csv").open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(row)).writerow(row)


def _edit_state(run: Path, edit: Callable[[dict], object]) -> None:
    state = json.loads((run / "state.json").read_text())
    edit(state)
    (run / "state.json").write_text(json.dumps(state))


def _edit_row(run: Path, index: int, **values: str) -> None:
    rows = _rows(run)
    rows[index].update(values)
    with (run / "evaluations.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _full_keep(run: Path) -> str:
    channels = json.loads((run / "results.json").read_text())["channels"]
    return " ".join(str(c) for c in channels.values())


def _over_budget(run: Path) -> None:
    ratios = " ".join("0.0000" for _ in _full_keep(run).split())
    _append_row(run, reward="1.0", accuracy="1.0", loss="0.0", macs_ratio="1.0", params_ratio="1.0",
                ratios=ratios, keep=_full_keep(run))  # fmt: skip
    _edit_state(run, lambda s: s.update(evals_done=3))


def _zero_kept(run: Path) -> None:
    keep = _rows(run)[0]["keep"].split()
    _edit_row(run, 0, keep=" ".join(["0", *keep[1:]]))


def _garbage_in_the_middle(run: Path) -> None:
    lines = (run / "evaluations.csv").read_text().splitlines(keepends=True)
    (run / "evaluations.csv").write_text("".join([lines[0], lines[1], "garbage,,here\n", lines[2]]))


FORGERIES: list[tuple[str, Callable[[Path], None], str]] = [
    ("over-budget row", _over_budget, "over the target"),
    ("emptied settings", lambda r: _edit_state(r, lambda s: s.update(settings={})), "does not record"),
    (
        "foreign target",
        lambda r: _edit_state(r, lambda s: s["settings"].update(target_macs=0.3)),
        "target_macs=0.3",
    ),
    ("NaN reward", lambda r: _edit_row(r, 1, reward="nan"), "non-finite"),
    ("zero kept count", _zero_kept, "kept count 0"),
    ("corrupt middle row", _garbage_in_the_middle, "line 3: not an evaluation row"),
    ("rows removed", lambda r: _edit_state(r, lambda s: s.update(evals_done=5)), "do not belong together"),
    ("state is a list", lambda r: (r / "state.json").write_text("[1, 2]"), "not a prune-env run state"),
    ("state is not JSON", lambda r: (r / "state.json").write_text("{oops"), "state.json is not readable"),
    (
        "no header",
        lambda r: (r / "evaluations.csv").write_text("1,2,3\n"),
        "the first line is not the header",
    ),
]


@pytest.mark.parametrize(("forge", "message"), [f[1:] for f in FORGERIES], ids=[f[0] for f in FORGERIES])
def test_forged_resumes_are_refused_and_files_left_intact(
    forge: Callable[[Path], None],
    message: str,
    two_evals: Path,
    tmp_path: Path,
    cached: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_evals, run)
    forge(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "log.txt"}
    assert _search(run, "--evals", "4", "--resume") == 2
    line = _one_error_line(capsys)
    assert message in line
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "log.txt"}
    assert after == before


# ------------------------------------------------------------------------------------------------ resume


def _interrupt_after(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    original = runfiles.RunLog.__call__

    def record(self: runfiles.RunLog, entry: object) -> None:
        original(self, entry)
        if self.state["evals_done"] == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(runfiles.RunLog, "__call__", record)


def _search_trace(out: Path) -> list[tuple[str, ...]]:
    return [(r["index"], r["keep"], r["reward"], r["accuracy"]) for r in _rows(out)]


def test_resumed_run_equals_the_uninterrupted_one(
    cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--agent", "evolution", "--evals", "6"]
    assert _search(tmp_path / "whole", *args) == 0
    with monkeypatch.context() as mp:
        _interrupt_after(3, mp)
        assert _search(tmp_path / "cut", *args) == 130
    assert len(_rows(tmp_path / "cut")) == 3
    assert _search(tmp_path / "cut", *args, "--resume") == 0
    assert _search_trace(tmp_path / "cut") == _search_trace(tmp_path / "whole")
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut")]
    assert results[0]["keep"] == results[1]["keep"]


def test_an_unfinetuned_model_is_the_one_the_proxy_scored(
    cached: Path, tmp_path: Path, digits: Splits
) -> None:
    """With no fine-tune the saved model carries recalibrated BatchNorm statistics: it scores on the
    proxy's validation subset exactly what the search's proxy reported (not the stale statistics' ~10%)."""
    out = tmp_path / "run"
    assert _search(out, "--evals", "2", "--target-macs", "0.3") == 0
    results = json.loads((out / "results.json").read_text())
    model = load_pruned(out / "model")
    plain = ProxyEvaluator(model, digits, eval_samples=96, bn_recalib_batches=0, finetune_steps=0, seed=0)
    assert plain.evaluate(model).accuracy == results["proxy_accuracy"]


def test_an_interrupted_run_saves_the_scored_model(
    cached: Path, tmp_path: Path, digits: Splits, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _interrupt_after(2, monkeypatch)
    assert _search(out, "--evals", "4", "--target-macs", "0.3") == 130
    results = json.loads((out / "results.json").read_text())
    model = load_pruned(out / "model")
    plain = ProxyEvaluator(model, digits, eval_samples=96, bn_recalib_batches=0, finetune_steps=0, seed=0)
    assert plain.evaluate(model).accuracy == results["proxy_accuracy"]
