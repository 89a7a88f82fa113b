"""The benchmark scripts' shared timing loop and results writer: the median of the timed repeats only, and a
results file that reloads as the payload plus where it came from, written in one step."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prune_env.app import measure
from prune_env.app.provenance import REVISION_FORMAT
from prune_env.errors import InvalidSettingError


def _fake_clock(monkeypatch: pytest.MonkeyPatch, readings: list[float]) -> Iterator[float]:
    ticks = iter(readings)
    monkeypatch.setattr(measure, "perf_counter", lambda: next(ticks))
    return ticks


def test_the_median_is_of_the_timed_repeats_only(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    # Start/stop readings of three timed calls: 3 s, 1 s and 10 s.
    ticks = _fake_clock(monkeypatch, [0.0, 3.0, 3.0, 4.0, 4.0, 14.0])
    times = measure.time_repeats(
        lambda: events.append("run"), 3, warmup=2, before_each=lambda: events.append("fresh")
    )
    assert times.seconds == (3.0, 1.0, 10.0)
    assert times.median == 3.0  # not the mean (4.67): one slow repeat does not move it
    assert times.spread == pytest.approx((10.0 - 1.0) / 3.0)
    assert events == ["run", "run", "fresh", "run", "fresh", "run", "fresh", "run"]  # warm-ups untimed
    assert next(ticks, None) is None  # the clock was read around each timed call, and only there


def test_an_even_number_of_repeats_takes_the_middle_two(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_clock(monkeypatch, [0.0, 2.0, 0.0, 4.0, 0.0, 1.0, 0.0, 8.0])
    assert measure.time_repeats(lambda: None, 4).median == 3.0


def test_timing_refuses_no_repeats() -> None:
    with pytest.raises(InvalidSettingError, match="repeats"):
        measure.time_repeats(lambda: None, 0)


def test_results_reload_with_the_payload_and_where_they_came_from(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    payload = {"args": {"seed": 0}, "rows": [{"accuracy": 0.5}]}
    measure.write_results(path, payload)
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in payload} == payload
    (record,) = saved[measure.PROVENANCE]
    assert REVISION_FORMAT.fullmatch(record["revision"])
    assert record["command"] == sys.argv
    assert record["versions"]["python"] and "torch" in record["versions"]
    assert record["hardware"]["cpu_count"] and "cpu_model" in record["hardware"]
    assert record["time"]
    assert "provenance" not in payload  # the caller's object is left as it was


def test_a_resumed_file_keeps_earlier_records_and_adds_this_process_once(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    earlier = {"revision": "f" * 40, "command": ["an", "earlier", "run"]}
    path.write_text(json.dumps({"rows": [1], measure.PROVENANCE: [earlier]}))
    saved = json.loads(path.read_text())
    for row in (2, 3):  # a resumable script rewrites the file after every row
        saved["rows"].append(row)
        measure.write_results(path, saved)
    again = json.loads(path.read_text())
    assert again["rows"] == [1, 2, 3]
    assert again[measure.PROVENANCE] == [earlier, measure.this_invocation()]
    measure.write_results(path, again)  # even read back from the file, this process is recorded once
    assert len(json.loads(path.read_text())[measure.PROVENANCE]) == 2


def test_results_that_cannot_be_written_leave_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    measure.write_results(path, {"rows": [1]})
    before = path.read_text()
    with pytest.raises(TypeError):
        measure.write_results(path, {"rows": [object()]})  # not JSON: fails before the disk is touched
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no half-written file beside it


def test_a_plain_json_file_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    measure.write_json(path, [{"a": 1}])
    assert json.loads(path.read_text()) == [{"a": 1}]
    with pytest.raises(TypeError):
        measure.write_json(path, [object()])
    assert json.loads(path.read_text()) == [{"a": 1}]
