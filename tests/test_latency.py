"""Latency tables and the analytic latency model (prune_env.latency) and `prune-env latency`.

Every table here is measured with a fast protocol (few repeats, no minimum sample length) on tiny models, one
thread. Nothing asserts a wall-clock threshold: timings on a loaded machine are only compared where the
difference is an order of magnitude of MACs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_output import one_error_line
from torch import nn

from prune_env import InvalidSettingError, build_graph, prune
from prune_env.app import cli, latency_command
from prune_env.latency import (
    LatencyModel,
    LatencySettings,
    LatencyTable,
    LatencyTableError,
    Timing,
    build_table,
    cached_table,
    estimate_noise,
    latency_model,
    load_table,
    measure_callable,
    measure_pruned,
    read_table,
    save_table,
    table_meta,
    table_path,
)
from prune_env.latency.build import RESIDUAL_FIT_RATIOS, fit_residual
from prune_env.latency.codec import table_to_json
from prune_env.latency.grid import axis_widths, bilinear
from prune_env.latency.measure import NoiseEstimate
from prune_env.latency.settings import available_cores
from prune_env.latency.table import TABLE_FORMAT

torch.set_num_threads(1)

# The timing protocol's module (its clock is replaced by a fake one in some tests).
protocol = importlib.import_module("prune_env.latency.measure")

QUICK_PROTOCOL = LatencySettings(
    warmup=1, repeats=3, min_sample_ms=0.0, max_attempts=1, grid_points=3, progress=False
)


class SmallNet(nn.Module):
    """Conv -> BN -> ReLU -> depthwise conv -> conv, pooled into a linear head: every kind of timed layer."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.conv2 = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, torch.Tensor, LatencyModel]:
    model = SmallNet().eval()
    x = torch.zeros(1, 3, 8, 8)
    return model, x, latency_model(model, x, QUICK_PROTOCOL, cache=False, architecture="small")


# ------------------------------------------------------------------------------------------------ grid


def test_axis_widths_hold_the_ends_and_aligned_widths() -> None:
    widths = axis_widths(64, 1, max_points=8)
    assert widths[0] == 1 and widths[-1] == 64
    assert list(widths) == sorted(set(widths)) and len(widths) <= 8
    assert {16, 32, 48} <= set(widths)  # aligned to 16 for a 64-wide axis
    assert axis_widths(6, 2, max_points=8) == (2, 3, 4, 5, 6)  # few widths: every one
    assert all(w % 4 == 0 for w in axis_widths(64, 1, max_points=6, step=4))
    for full in (1, 2, 7, 9, 16, 33, 64, 100, 128, 512, 2048):
        for low in {w for w in (1, 2, full // 3 or 1, full) if w <= full}:
            for points in (2, 3, 5, 8):
                got = axis_widths(full, low, points)
                assert got[0] == low and got[-1] == full and len(got) <= points, (full, low, points, got)
                assert list(got) == sorted(set(got))
    wide = axis_widths(512, 1, max_points=8)
    assert len(wide) <= 8 and wide[-1] == 512 and 480 in wide and all(w % 32 == 0 for w in wide[1:] if w > 16)


def test_interpolation_is_exact_at_grid_points_and_monotone_between() -> None:
    xs, ys = np.array([1.0, 4.0, 8.0, 16.0]), np.array([1.0, 8.0, 32.0])
    rng = np.random.default_rng(0)
    # Increasing along both axes, as latency usually is.
    values = np.cumsum(np.cumsum(rng.uniform(0.1, 1.0, (4, 3)), axis=0), axis=1)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    np.testing.assert_array_equal(bilinear(xs, ys, values, gx, gy), values)  # exact, not approximately
    fine = np.linspace(1, 16, 61)
    for y in (1.0, 5.0, 20.0, 32.0):
        assert np.all(np.diff(bilinear(xs, ys, values, fine, y)) >= 0)
    # Outside the grid: clipped to its edge; one-point axes are constants.
    assert bilinear(xs, ys, values, 100.0, 0.0) == values[-1, 0]
    assert bilinear(np.array([3.0]), ys, values[:1], 7.0, 8.0) == values[0, 1]


def test_table_interpolation_is_exact_at_its_measured_points(
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
) -> None:
    table = small[2].table
    layer = max(table.layers, key=lambda lay: len(lay.in_widths) * len(lay.out_widths))
    assert len(layer.in_widths) > 1 and len(layer.out_widths) > 1
    for i, w_in in enumerate(layer.in_widths):
        for j, w_out in enumerate(layer.out_widths):
            assert float(layer.at(w_in, w_out)) == layer.ms[i][j]


# ------------------------------------------------------------------------------------------------ the model


def test_table_times_every_kind_of_layer(small: tuple[nn.Module, torch.Tensor, LatencyModel]) -> None:
    table = small[2].table
    kinds = {layer.label: layer for layer in table.layers}
    assert set(kinds) == {"conv1", "dw", "conv2", "fc"}
    assert kinds["dw"].kind == "depthwise" and len(kinds["dw"].in_widths) == 1  # one width: its channels
    assert kinds["conv1"].in_widths == (3,)  # the image's channels are never pruned
    assert kinds["conv1"].input_shape == (3, 8, 8) and kinds["fc"].kind == "linear"
    assert table.meta.model == "small" and table.meta.batch == 1 and table.meta.threads == 1
    assert table.meta.torch == torch.__version__ and table.meta.input_shape == ((3, 8, 8),)


def test_table_knows_each_layers_output_size_and_fits_its_residual(
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
) -> None:
    table = small[2].table
    spatial = {layer.label: layer.out_spatial for layer in table.layers}
    assert spatial == {"conv1": 64, "dw": 64, "conv2": 64, "fc": 1}  # 8 x 8 images, then a vector
    assert len(table.residual_points) == len(RESIDUAL_FIT_RATIOS) and table.residual_slope_ms >= 0
    assert all(0 < fraction < 1 for fraction, _ in table.residual_points)


def test_the_residual_slope_is_fitted_through_the_full_width_point(
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
) -> None:
    """Whole-model measurements made by a known slope are fitted back to it; the full-width prediction stays
    the measured latency; a residual that grew when pruning (noise) leaves the residual constant."""
    lat = small[2]
    table = dataclasses.replace(lat.table, residual_slope_ms=0.0, residual_points=())
    costs = lat.graph.costs
    slope = 0.5 * abs(table.residual_ms) + 0.01
    measured = []
    for ratio in (0.3, 0.6, 0.9):
        kept = costs.kept(lat.graph.keep_counts(ratio))
        w_in, w_out = table.layer_widths(kept)
        layers = float(table.layer_ms(w_in, w_out).sum())
        measured.append((kept, layers + table.residual_ms - slope * (1.0 - table.activations(w_out)[0])))
    fitted = fit_residual(table, measured)
    assert fitted.residual_slope_ms == pytest.approx(slope)
    assert fitted.constant_ms == pytest.approx(table.residual_ms - slope)
    assert fitted.predict_kept(costs.kept(costs.full_keep()))[0] == pytest.approx(table.whole.median_ms)
    for kept, ms in measured:
        assert fitted.predict_kept(kept)[0] == pytest.approx(ms)
    grown = [(kept, ms + 10 * slope) for kept, ms in measured]
    assert fit_residual(table, grown).residual_slope_ms == 0.0


def test_layers_are_timed_in_the_memory_format_the_model_runs_them_in() -> None:
    """The zoo's CNNs convert their input to channels-last: their layers are timed on channels-last
    inputs, with weights as the model holds them; a plain NCHW model's layers on NCHW inputs."""
    from prune_env.latency.layers import instantiate, timed_layers
    from prune_env.models import get_model

    zoo = get_model("resnet20", 10, 3).eval()
    x = torch.zeros(1, 3, 8, 8)
    specs, _ = timed_layers(zoo, build_graph(zoo, x), x)
    convs = [s for s in specs if s.kind == "conv"]
    assert convs and all(s.channels_last for s in convs)
    layer, sample = instantiate(zoo, convs[1], 4, 4, 2, torch.device("cpu"))
    assert sample.is_contiguous(memory_format=torch.channels_last) and not sample.is_contiguous()
    assert isinstance(layer, nn.Conv2d) and layer.weight.is_contiguous()  # the zoo keeps NCHW weights
    plain = SmallNet().eval()
    specs, _ = timed_layers(plain, build_graph(plain, x), x)
    assert not any(s.channels_last for s in specs)
    assert instantiate(plain, specs[0], 3, 4, 2, torch.device("cpu"))[1].is_contiguous()


def test_prediction_at_full_width_is_the_measured_whole_latency(
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
) -> None:
    lat = small[2]
    full = lat.graph.costs.full_keep()
    assert lat.predict(full) == pytest.approx(lat.table.whole.median_ms, rel=1e-12)
    assert lat.ratio(full) == pytest.approx(1.0, rel=1e-12)
    assert lat.table.residual_ms == pytest.approx(lat.table.whole.median_ms - lat.table.layers_full_ms)


def test_predict_is_analytic_deterministic_and_vectorised(
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
) -> None:
    model, _, lat = small

    def no_forward(*args: object) -> None:
        raise AssertionError("predict ran the model")

    handle = model.register_forward_pre_hook(no_forward)
    try:
        rng = np.random.default_rng(1)
        full = lat.graph.costs.full_keep()
        keeps = rng.integers(1, full + 1, size=(50, len(full)))
        batch = lat.predict(keeps)
        assert batch.shape == (50,)
        assert [lat.predict(k) for k in keeps] == pytest.approx(batch, rel=1e-12)
        np.testing.assert_array_equal(lat.predict(keeps), batch)  # same input, same answer
        assert lat.predict_ratios(0.5) == lat.predict(lat.graph.keep_counts(0.5))
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda full: [*full, 1], "entries per row"),
        (lambda full: [0, *full[1:]], "between 1"),
        (lambda full: [full[0] + 1, *full[1:]], "between 1"),
        (lambda full: [1.5, *full[1:]], "whole numbers"),
    ],
)
def test_predict_refuses_impossible_keeps(
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
    make: Callable[[list[int]], list[float]],
    message: str,
) -> None:
    lat = small[2]
    with pytest.raises(InvalidSettingError, match=message):
        lat.predict(make(lat.full_keep.tolist()))


def test_a_table_of_another_model_is_refused(small: tuple[nn.Module, torch.Tensor, LatencyModel]) -> None:
    other = SmallNet(width=8).eval()
    graph = build_graph(other, small[1])
    with pytest.raises(LatencyTableError, match="another model"):
        LatencyModel(graph, small[2].table)


def test_predicted_and_measured_latency_agree_in_order() -> None:
    """A conv net whose convolutions dominate: pruned hard, it is predicted (and measured) faster than pruned
    lightly; only an ordering with a ~10x MACs difference is asserted, never a time."""
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    x = torch.zeros(1, 3, 16, 16)
    settings = dataclasses.replace(QUICK_PROTOCOL, repeats=5)
    lat = latency_model(model, x, settings, cache=False)
    light, heavy = lat.graph.keep_counts(0.1), lat.graph.keep_counts(0.75)
    assert lat.ratio(heavy) < lat.ratio(light) < 1.0 + 1e-12
    measured = {
        name: measure_pruned(prune(model, x, ratio, graph=lat.graph), x, settings).min_ms
        for name, ratio in (("light", 0.1), ("heavy", 0.75))
    }
    assert measured["heavy"] < measured["light"]
    # The unpruned model's prediction is its table's measurement: relative error 0 by construction.
    assert (
        lat.predict(lat.graph.costs.full_keep()) - lat.table.whole.median_ms
    ) / lat.table.whole.median_ms == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ protocol


class FakeClock:
    """A perf_counter_ns the measured callable advances by scripted durations (ms): timings without time."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.now = 0
        self.durations = iter(durations_ms)

    def __call__(self) -> int:
        return self.now

    def step(self) -> None:
        self.now += int(next(self.durations) * 1e6)


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[float]], FakeClock]:
    def install(durations: list[float]) -> FakeClock:
        clock = FakeClock(durations)
        monkeypatch.setattr(protocol, "perf_counter_ns", clock)
        return clock

    return install


def test_a_noisy_measurement_is_repeated_then_flagged(fake_clock: Callable[[list[float]], FakeClock]) -> None:
    settings = dataclasses.replace(QUICK_PROTOCOL, warmup=0, repeats=4, max_attempts=3, noise_bound=0.25)
    clock = fake_clock([1.0, 3.0, 1.0, 3.0] * 3)
    timing = measure_callable(clock.step, settings)
    assert timing.noisy and timing.attempts == 3 and timing.repeats == 4
    assert timing.median_ms == pytest.approx(2.0) and timing.min_ms == pytest.approx(1.0)
    # Noisy first, quiet on the second attempt: kept, clean, and says it took two.
    clock = fake_clock([1.0, 3.0, 1.0, 3.0, 2.0, 2.0, 2.1, 2.0])
    timing = measure_callable(clock.step, settings)
    assert not timing.noisy and timing.attempts == 2 and timing.median_ms == pytest.approx(2.0)


def test_noise_estimate_is_the_relative_spread_of_medians(
    fake_clock: Callable[[list[float]], FakeClock],
) -> None:
    settings = dataclasses.replace(QUICK_PROTOCOL, warmup=0, repeats=1, max_attempts=1)
    clock = fake_clock([1.0, 1.1, 1.2])
    noise = estimate_noise(clock.step, settings, rounds=3)
    assert noise.medians_ms == pytest.approx((1.0, 1.1, 1.2))
    assert noise.relative_spread == pytest.approx(0.2 / 1.1)
    assert noise.distinguishes(1.0, 2.0) and not noise.distinguishes(1.0, 1.05)


def test_measurement_runs_in_inference_mode_at_its_thread_count() -> None:
    if available_cores() < 2:
        pytest.skip("needs two cores to tell the thread counts apart")
    seen: list[tuple[bool, int]] = []
    settings = dataclasses.replace(QUICK_PROTOCOL, threads=2)
    timing = measure_callable(
        lambda: seen.append((torch.is_inference_mode_enabled(), torch.get_num_threads())), settings
    )
    assert set(seen) == {(True, 2)} and isinstance(timing, Timing)
    assert torch.get_num_threads() == 1  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_is_timed_with_events() -> None:  # pragma: no cover - no GPU in CI
    settings = dataclasses.replace(QUICK_PROTOCOL, device="cuda")
    a = torch.randn(256, 256, device="cuda")
    timing = measure_callable(lambda: a @ a, settings)
    assert timing.median_ms > 0 and settings.device.startswith("cuda:")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch", 0, "batch must be an integer >= 1, got 0"),
        ("batch", 1.5, "batch must be an integer"),
        ("batch", True, "batch must be an integer"),
        ("threads", 0, "threads must be an integer >= 1"),
        ("threads", available_cores() + 1, f"may run on {available_cores()} CPU"),
        ("repeats", 0, "repeats must be an integer >= 1"),
        ("device", "tpu", "unknown device 'tpu'; available devices: cpu"),
        ("device", 3, "device must be a name"),
        ("noise_bound", 0.0, "noise_bound must be > 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_fix(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidSettingError, match=message.replace("(", r"\(")):
        LatencySettings(**{field: value})  # type: ignore[arg-type]


def test_latency_model_checks_its_arguments_before_any_work(tmp_path: Path) -> None:
    model = SmallNet().eval()
    with pytest.raises(InvalidSettingError, match="batch must be"):
        latency_model(model, torch.zeros(1, 3, 8, 8), QUICK_PROTOCOL, batch=0, cache_root=tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ cache


@pytest.fixture
def counted_build(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the tables measured through latency_model."""
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> LatencyTable:
        calls.append(1)
        return build_table(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("prune_env.latency.cost.build_table", counting)
    return calls


def test_cache_round_trip(tmp_path: Path, counted_build: list[int]) -> None:
    model, x = SmallNet().eval(), torch.zeros(1, 3, 8, 8)
    first = latency_model(model, x, QUICK_PROTOCOL, cache_root=tmp_path, architecture="small")
    second = latency_model(model, x, QUICK_PROTOCOL, cache_root=tmp_path, architecture="small")
    assert len(counted_build) == 1  # the second came from the cache
    assert second.table == first.table and second.full_ms == first.full_ms
    path = table_path(first.table.meta, tmp_path)
    assert path.parent == tmp_path / "latency" and path.name.startswith("small-")
    assert "pickle" not in path.read_text() and json.loads(path.read_text())["format"] == TABLE_FORMAT
    # Another batch is another table (a new measurement, not the cached one).
    latency_model(model, x, QUICK_PROTOCOL, batch=2, cache_root=tmp_path, architecture="small")
    assert len(counted_build) == 2


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("batch", 4, "batch 4 (here: 1)"),
        ("threads", 2, "threads 2 (here: 1)"),
        ("torch", "1.0.0", "torch version '1.0.0'"),
    ],
)
def test_a_table_measured_for_other_settings_is_refused(
    tmp_path: Path, small: tuple[nn.Module, torch.Tensor, LatencyModel], field: str, value: object, named: str
) -> None:
    table = small[2].table
    data = json.loads(table_to_json(table))
    data["meta"][field] = value
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_table(path, table.meta)
    # At the cache's own path too: a valid table for other settings is an error, never silently replaced.
    cached = table_path(table.meta, tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match=field if field != "torch" else "torch version"):
        cached_table(table.meta, lambda: table, tmp_path)


def test_a_truncated_cached_table_warns_and_is_measured_again(
    tmp_path: Path, small: tuple[nn.Module, torch.Tensor, LatencyModel]
) -> None:
    table = small[2].table
    path = table_path(table.meta, tmp_path)
    save_table(table, path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    measured: list[int] = []

    def measure_again() -> LatencyTable:
        measured.append(1)
        return table

    with pytest.warns(UserWarning, match="unusable cached latency table"):
        got, where, from_cache = cached_table(table.meta, measure_again, tmp_path)
    assert measured == [1] and not from_cache and where == path and got == table
    assert read_table(path) == table  # replaced by a complete one


def test_a_table_cached_under_another_name_serves_the_same_key(
    tmp_path: Path, counted_build: list[int]
) -> None:
    # `prune-env latency vgg11_quarter` caches "vgg11_quarter-<key>"; a problem that knows only the module
    # looks for "model-<key>". Same structure and settings: the first table serves both, never re-measured.
    model, x = SmallNet().eval(), torch.zeros(1, 3, 8, 8)
    named = latency_model(model, x, QUICK_PROTOCOL, cache_root=tmp_path, architecture="small")
    anonymous = latency_model(model, x, QUICK_PROTOCOL, cache_root=tmp_path)
    assert len(counted_build) == 1 and anonymous.table == named.table
    assert [p.name.split("-")[0] for p in (tmp_path / "latency").iterdir()] == ["small"]


def test_a_table_measured_on_a_busy_machine_warns_at_every_use(
    tmp_path: Path, small: tuple[nn.Module, torch.Tensor, LatencyModel]
) -> None:
    bound = float(small[2].table.protocol["noise_bound"])
    quiet = dataclasses.replace(small[2].table, noise=bound / 2)
    busy = dataclasses.replace(quiet, noise=bound * 2.3)
    assert busy.disturbed and not quiet.disturbed
    with pytest.warns(
        UserWarning, match=rf"moved {bound * 2.3:.0%} .*bound is {bound:.0%}.*nothing else running"
    ):
        cached_table(busy.meta, lambda: busy, tmp_path)  # measured now
    with pytest.warns(UserWarning, match="other work shared the cores"):
        got, _, from_cache = cached_table(busy.meta, lambda: quiet, tmp_path)  # and from the cache
    assert from_cache and got == busy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a quiet table is used without a word
        cached_table(quiet.meta, lambda: quiet, tmp_path / "other")


def test_the_tables_noise_is_estimated_again_while_it_exceeds_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spreads = iter([0.9, 0.4, 0.02, 0.5])  # a busy machine, then a quiet one: the estimate stops there
    calls: list[float] = []

    def estimate(*args: object, **kwargs: object) -> NoiseEstimate:
        calls.append(spread := next(spreads))
        return NoiseEstimate((1.0, 1.0 + spread), spread)

    monkeypatch.setattr("prune_env.latency.build.estimate_noise", estimate)
    model, x = SmallNet().eval(), torch.zeros(1, 3, 8, 8)
    patient = dataclasses.replace(QUICK_PROTOCOL, max_attempts=3)
    table = build_table(model, build_graph(model, x), x, patient)
    assert calls == [0.9, 0.4, 0.02] and table.noise == 0.02 and not table.disturbed
    # Never quiet within max_attempts: the quietest is kept, and the table says it is disturbed.
    spreads, calls[:] = iter([0.9, 0.6, 0.7]), []
    table = build_table(model, build_graph(model, x), x, patient)
    assert calls == [0.9, 0.6, 0.7] and table.noise == 0.6 and table.disturbed


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["whole"].update(median_ms="fast"),
        lambda d: d["layers"][0].update(ms=[[1.0]]),
        lambda d: d.update(residual_ms=123.0),
        lambda d: d.update(format=0),
        lambda d: d.update(residual_slope_ms=-1.0),
        lambda d: d.update(residual_points=[[0.5]]),
        lambda d: d["layers"][0].update(out_spatial=0),
        lambda d: d["layers"][0].pop("out_spatial"),
    ],
)
def test_an_edited_table_is_not_a_table(
    tmp_path: Path,
    small: tuple[nn.Module, torch.Tensor, LatencyModel],
    damage: Callable[[dict[str, object]], None],
) -> None:
    data = json.loads(table_to_json(small[2].table))
    damage(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match="not a usable latency table"):
        read_table(path)
    path.write_text(table_to_json(small[2].table).replace('"noise": ', '"noise": NaN, "x": ', 1))
    with pytest.raises(LatencyTableError, match="not valid JSON"):
        read_table(path)


def test_noisy_flags_survive_the_json(
    small: tuple[nn.Module, torch.Tensor, LatencyModel], tmp_path: Path
) -> None:
    table = small[2].table
    layer = table.layers[0]
    flagged = dataclasses.replace(layer, noisy=tuple(tuple(True for _ in row) for row in layer.noisy))
    noisy = dataclasses.replace(
        table, layers=(flagged, *table.layers[1:]), whole=dataclasses.replace(table.whole, noisy=True)
    )
    save_table(noisy, tmp_path / "t.json")
    again = read_table(tmp_path / "t.json")
    others = sum(sum(row) for lay in table.layers[1:] for row in lay.noisy)  # a busy machine flags some
    assert again.noisy_points == noisy.noisy_points == others + sum(len(r) for r in layer.noisy) + 1
    assert again.whole.noisy and all(all(row) for row in again.layers[0].noisy)


def test_build_table_refuses_a_foreign_graph(small: tuple[nn.Module, torch.Tensor, LatencyModel]) -> None:
    other = SmallNet(width=8).eval()
    with pytest.raises(InvalidSettingError, match="different model"):
        build_table(other, small[2].graph, small[1], QUICK_PROTOCOL)
    assert table_meta(other, small[1], QUICK_PROTOCOL).model_hash != small[2].table.meta.model_hash


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def fast_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The command's protocol made fast (its options still checked as typed), the cache in tmp_path."""
    real = latency_command._settings
    monkeypatch.setattr(
        latency_command,
        "_settings",
        lambda args: dataclasses.replace(
            real(args), warmup=0, min_sample_ms=0.0, max_attempts=1, grid_points=3
        ),
    )
    monkeypatch.setenv("PRUNE_ENV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_cli_writes_the_table_and_the_plot(
    fast_cli: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lat"
    args = ["latency", "tiny", "--repeats", "2", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "tiny on digits" in printed and "residual" in printed and "conv1" in printed
    table = read_table(out / "latency.json")
    assert table.meta.model == "tiny" and table.meta.input_shape == ((1, 8, 8),)
    assert (out / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert set(p.name for p in out.iterdir()) == {"latency.json", "latency.png"}
    # Refused without --force (nothing changed), replaced with it (the table now from the cache).
    before = (out / "latency.json").read_bytes()
    assert cli.main(args) == 2
    assert "exists; pass --force" in one_error_line(capsys.readouterr().err)
    assert cli.main([*args, "--force"]) == 0
    assert (out / "latency.json").read_bytes() == before  # the cached table, written again


def test_cli_never_replaces_a_directory_holding_other_files(
    fast_cli: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["latency", "tiny", "--no-progress", "--out", str(out), "--force"]) == 2
    assert "holding other files" in one_error_line(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
        (["--threads", str(available_cores() + 1)], "--threads must be an integer >= 1 and <="),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--repeats", "0"], "--repeats must be an integer >= 1"),
        (["--batch", "x"], "invalid int value"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(
    fast_cli: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "never"
    assert cli.main(["latency", "tiny", "--no-progress", "--out", str(out), *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()
