"""Where benchmark results came from: the revision, versions, hardware, command and full agent settings
recorded with them, and the refusal to resume or combine results of other code or other settings unless
asked to mix them (and then the table says so)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prune_env.app import benchmark, provenance
from prune_env.app.results import BenchmarkResults
from prune_env.app.tidy_files import RUN_FIELDS, write_csv
from prune_env.errors import InvalidSettingError

PROBLEM = {"eval_samples": 96, "bn_recalib_batches": 1}
REVISION = r"[0-9a-f]{40}(\+dirty)?|unknown"
OTHER = "f" * 40  # a revision no checkout here has


def _git(where: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def _grid(out: Path, **overrides: Any) -> BenchmarkResults:
    kwargs: dict[str, Any] = {
        "agents": ("uniform",),
        "seeds": (0,),
        "evals": 2,
        "out": out,
        "problem_kwargs": PROBLEM,
        "progress": False,
    }
    return benchmark.run(**{**kwargs, **overrides})


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_this_checkout_has_a_revision_of_the_recorded_format() -> None:
    found = provenance.revision()
    assert provenance.REVISION_FORMAT.fullmatch(found)
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:  # a git checkout, as the test suite is normally run
        assert found.removesuffix("+dirty") == head.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_revision_is_clean_dirty_or_unknown(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    clean = provenance.revision(repo)
    assert len(clean) == 40 and set(clean) <= set("0123456789abcdef")
    (repo / "notes.txt").write_text("untracked files are not changes to the code\n")
    assert provenance.revision(repo) == clean
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.revision(repo) == clean + "+dirty"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.revision(plain) == "unknown"  # not a checkout: recorded as unknown, no error
    assert provenance.revision(tmp_path / "missing") == "unknown"


def test_a_record_holds_versions_hardware_command_and_full_agent_settings() -> None:
    from agents.evolution import EvolutionSettings

    def my_agent(evaluator: Any, rng: Any) -> None:
        """A user's agent function."""

    agents = provenance.agent_settings(
        [("evolution", "evolution"), ("uniform", "uniform"), ("mine", my_agent)],
        {"evolution": {"mutation_prob": 0.2}},
    )
    record = provenance.make_record(agents)
    json.dumps(record, allow_nan=False)  # plain JSON, as runs.json stores it
    assert provenance.REVISION_FORMAT.fullmatch(record["revision"])
    assert {"python", "prune_env", "torch", "torchvision", "gymnasium", "stable-baselines3"} <= set(
        record["versions"]
    )
    hardware = record["hardware"]
    assert {"platform", "cpu_model", "cpu_count", "torch_threads", "cuda_devices"} <= set(hardware)
    assert hardware["cpu_count"] >= 1 and hardware["torch_threads"] >= 1 and hardware["cpu_model"]
    assert record["command"] == sys.argv
    # Every setting of the dataclass, defaults included, with the override applied.
    expected = {f.name: getattr(EvolutionSettings(), f.name) for f in dataclasses.fields(EvolutionSettings)}
    assert agents["evolution"] == {"agent": "evolution", "settings": {**expected, "mutation_prob": 0.2}}
    assert agents["uniform"] == {"agent": "uniform", "settings": {}}
    assert agents["mine"]["agent"].endswith("my_agent") and agents["mine"]["settings"] == {}


def test_sb3_agents_record_their_full_settings() -> None:
    agents = provenance.agent_settings([("ppo", "ppo")], {"ppo": {"learner_kwargs": {"n_steps": 8}}})
    assert agents["ppo"]["settings"] == {
        "env": None,
        "tensorboard_log": None,
        "verbose": 0,
        "learner_kwargs": {"n_steps": 8},
    }


def test_a_grid_records_its_provenance(tmp_path: Path, cached: Path) -> None:
    _grid(tmp_path)
    saved = json.loads((tmp_path / "runs.json").read_text())
    (record,) = saved["provenance"]
    assert {"revision", "time", "command", "versions", "hardware", "agents"} <= set(record)
    assert record["agents"] == {"uniform": {"agent": "uniform", "settings": {}}}
    (row,) = _rows(tmp_path / "runs.csv")
    assert list(row) == list(RUN_FIELDS)
    assert row["revision"] == record["revision"] == provenance.revision()
    # Each invocation that adds runs adds its record; one that adds nothing leaves the file alone.
    _grid(tmp_path, seeds=(0, 1))
    _grid(tmp_path, seeds=(0, 1))
    loaded = BenchmarkResults.load(tmp_path)
    assert len(loaded.provenance) == 2 and {r["directory"] for r in loaded.provenance} == {str(tmp_path)}
    assert {r["revision"] for r in loaded.runs} == {provenance.revision()}
    assert "MIXED" not in loaded.table()


def _pretend_other_code(out: Path) -> None:
    """Rewrite a grid's files as if another revision of the code had made them."""
    rows = _rows(out / "runs.csv")
    write_csv(out / "runs.csv", RUN_FIELDS, [{**r, "revision": OTHER} for r in rows])
    saved = json.loads((out / "runs.json").read_text())
    for record in saved["provenance"]:
        record["revision"] = OTHER
    (out / "runs.json").write_text(json.dumps(saved))


def test_resume_refuses_other_code_unless_allowed(tmp_path: Path, cached: Path) -> None:
    _grid(tmp_path)
    _pretend_other_code(tmp_path)
    before = (tmp_path / "runs.csv").read_text()
    with pytest.raises(InvalidSettingError, match="revisions differ") as refused:
        _grid(tmp_path, seeds=(0, 1))
    message = str(refused.value)
    assert OTHER in message and provenance.revision() in message and str(tmp_path) in message
    assert (tmp_path / "runs.csv").read_text() == before  # nothing run, nothing written
    results = _grid(tmp_path, seeds=(0, 1), allow_mixed=True)
    assert [r["revision"] for r in results.runs] == [OTHER, provenance.revision()]
    first = results.table().splitlines()[0]
    assert first.startswith("MIXED (allowed): revisions differ") and OTHER in first
    assert provenance.revision() in first


def test_resume_refuses_other_agent_settings_unless_allowed(tmp_path: Path, cached: Path) -> None:
    changed = {"evolution": {"mutation_prob": 0.2}}
    _grid(tmp_path, agents=("evolution",), evals=3, agent_settings=changed)
    with pytest.raises(InvalidSettingError, match="settings of agent 'evolution' differ") as refused:
        _grid(tmp_path, agents=("evolution",), evals=3, seeds=(0, 1))
    assert "mutation_prob=0.2" in str(refused.value) and "mutation_prob=0.1" in str(refused.value)
    _grid(tmp_path, agents=("evolution",), evals=3, seeds=(0, 1), agent_settings=changed)  # the same: fine
    results = _grid(tmp_path, agents=("evolution",), evals=3, seeds=(0, 1, 2), allow_mixed=True)
    assert "settings of agent 'evolution' differ: mutation_prob=0.2" in results.table().splitlines()[0]


def _make_old(out: Path) -> None:
    """Strip a grid's files back to what the harness wrote before it recorded provenance."""
    old_fields = [f for f in RUN_FIELDS if f != "revision"]
    write_csv(out / "runs.csv", old_fields, _rows(out / "runs.csv"))
    saved = json.loads((out / "runs.json").read_text())
    del saved["provenance"]
    for row in saved["runs"]:
        del row["revision"]
    (out / "runs.json").write_text(json.dumps(saved))


def test_an_old_directory_loads_as_unknown_and_resumes_only_when_allowed(
    tmp_path: Path, cached: Path
) -> None:
    _grid(tmp_path)
    _make_old(tmp_path)
    old = BenchmarkResults.load(tmp_path)
    assert len(old.runs) == 1 and old.provenance == []
    assert [r["revision"] for r in old.records()] == ["unknown"]
    assert "uniform" in old.table() and "MIXED" not in old.table()
    if provenance.revision() != "unknown":
        with pytest.raises(InvalidSettingError, match=r"unknown in .*; .* in this run"):
            _grid(tmp_path, seeds=(0, 1))
    results = _grid(tmp_path, seeds=(0, 1), allow_mixed=True)
    rows = _rows(tmp_path / "runs.csv")
    assert list(rows[0]) == list(RUN_FIELDS)  # rewritten with the new column, the old row blank in it
    assert [r["revision"] for r in rows] == ["", provenance.revision()]
    assert list(tmp_path.glob("runs.csv.*.orig"))  # the file as it was, kept aside
    assert len(results.runs) == 2


def _directory(path: Path, revision: str | None, agent: str = "uniform") -> BenchmarkResults:
    path.mkdir()
    fields = [f for f in RUN_FIELDS if revision is not None or f != "revision"]
    row = {"agent": agent, "model": "m", "dataset": "d", "target": 0.5, "seed": 0, "metric": "macs",
           "evals_used": 1, "best_accuracy": 0.5, "macs_ratio": 0.5, "params_ratio": 0.5,
           "val_accuracy": 0.8, "test_accuracy": 0.8, "seconds": 1.0, "revision": revision}  # fmt: skip
    write_csv(path / "runs.csv", fields, [row])
    return BenchmarkResults.load(path)


def test_combine_refuses_other_revisions_naming_both_unless_allowed(tmp_path: Path) -> None:
    a = _directory(tmp_path / "a", "a" * 40)
    b = _directory(tmp_path / "b", "b" * 40 + "+dirty", agent="random")
    with pytest.raises(InvalidSettingError) as refused:
        BenchmarkResults.combine([a, b])
    message = str(refused.value)
    assert f"{'a' * 40} in {tmp_path / 'a'}" in message and f"{'b' * 40}+dirty in {tmp_path / 'b'}" in message
    combined = BenchmarkResults.combine([a, b], allow_mixed=True)
    assert len(combined.runs) == 2
    assert combined.table().splitlines()[0] == (
        f"MIXED (allowed): revisions differ: {'a' * 40} in {tmp_path / 'a'}; {'b' * 40}+dirty in {tmp_path / 'b'}"
    )
    # A directory written before revisions were recorded counts as "unknown".
    old = _directory(tmp_path / "old", None, agent="random")
    assert [r["revision"] for r in old.records()] == ["unknown"]
    with pytest.raises(InvalidSettingError, match=f"{'a' * 40} in .*; unknown in {tmp_path / 'old'}"):
        BenchmarkResults.combine([a, old])
    assert BenchmarkResults.combine([old, _directory(tmp_path / "old2", None)]).runs  # both unknown: alike
    with pytest.raises(InvalidSettingError, match="allow_mixed must be"):
        BenchmarkResults.combine([a], allow_mixed="yes")  # type: ignore[arg-type]


def test_combine_refuses_other_agent_settings_unless_allowed(tmp_path: Path) -> None:
    def part(name: str, prob: float) -> BenchmarkResults:
        results = _directory(tmp_path / name, "a" * 40)
        settings = {"evolution": {"agent": "evolution", "settings": {"mutation_prob": prob, "top_k": None}}}
        results.provenance = [{"revision": "a" * 40, "agents": settings, "directory": str(results.out)}]
        return results

    first, second = part("x", 0.1), part("y", 0.3)
    with pytest.raises(InvalidSettingError, match="settings of agent 'evolution' differ") as refused:
        BenchmarkResults.combine([first, second])
    message = str(refused.value)
    assert (
        f"mutation_prob=0.1 in {tmp_path / 'x'}" in message
        and f"mutation_prob=0.3 in {tmp_path / 'y'}" in message
    )
    assert "top_k" not in message  # only what differs
    table = BenchmarkResults.combine([first, second], allow_mixed=True).table()
    assert table.splitlines()[0].startswith("MIXED (allowed): settings of agent 'evolution' differ")
    assert len(BenchmarkResults.combine([first, part("z", 0.1)]).runs) == 1  # the same settings combine
