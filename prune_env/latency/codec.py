"""A latency table as JSON: plain numbers, strings, booleans and lists (never pickle), read strictly.

:func:`table_from_json` takes what :func:`prune_env.serialize.loads_strict` parsed (NaN, Infinity and
repeated keys already refused) and checks every field's presence, type and consistency -- grids of the
right shape, increasing widths, non-negative times, the residual equal to what the numbers give -- so an
edited or truncated file is a :class:`~prune_env.errors.LatencyTableError`, never a table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from prune_env.errors import LatencyTableError
from prune_env.latency.measure import Timing
from prune_env.latency.table import RESIDUAL_RULE, TABLE_FORMAT, LatencyTable, LayerTable, TableMeta


def table_to_json(table: LatencyTable) -> str:
    data = {
        "format": table.meta.format,
        "meta": {**asdict(table.meta), "residual_rule": RESIDUAL_RULE},
        "whole": asdict(table.whole),
        "noise": table.noise,
        "residual_ms": table.residual_ms,
        "residual_slope_ms": table.residual_slope_ms,
        "residual_points": [list(point) for point in table.residual_points],
        "protocol": dict(table.protocol),
        "untimed": list(table.untimed),
        "layers": [asdict(layer) for layer in table.layers],
    }
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


# ------------------------------------------------------------------------------------------------ reading


def _bad(why: str) -> LatencyTableError:
    return LatencyTableError(f"not a usable latency table: {why}")


_KINDS: dict[str, tuple[type, ...]] = {
    "number": (int, float),
    "int": (int,),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "object": (dict,),
}


def _get(obj: Any, key: str, kind: str, where: str) -> Any:
    """``obj[key]``, which must be of ``kind`` (a key of ``_KINDS``; a finite number for "number")."""
    if not isinstance(obj, dict) or key not in obj:
        raise _bad(f"{where} has no {key!r}")
    value = obj[key]
    # bool is an int in Python: a table never means True where it says a number.
    if not isinstance(value, _KINDS[kind]) or (isinstance(value, bool) and kind != "bool"):
        raise _bad(f"{where}.{key} is {value!r:.80}, not {'a JSON ' + kind}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"{where}.{key} is not finite")
    return value


def _ints(values: Any, where: str, low: int = 0) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(type(v) is int and v >= low for v in values):
        raise _bad(f"{where} must be a list of integers >= {low}, got {values!r:.80}")
    return tuple(values)


def _timing(obj: Any, where: str) -> Timing:
    timing = Timing(
        median_ms=float(_get(obj, "median_ms", "number", where)),
        min_ms=float(_get(obj, "min_ms", "number", where)),
        iqr_ms=float(_get(obj, "iqr_ms", "number", where)),
        repeats=_get(obj, "repeats", "int", where),
        number=_get(obj, "number", "int", where),
        attempts=_get(obj, "attempts", "int", where),
        noisy=_get(obj, "noisy", "bool", where),
    )
    if min(timing.median_ms, timing.min_ms, timing.iqr_ms) < 0 or min(timing.repeats, timing.number) < 1:
        raise _bad(f"{where} holds negative times or no repeats")
    return timing


def _layer(obj: Any, where: str) -> LayerTable:
    in_widths = _ints(_get(obj, "in_widths", "list", where), f"{where}.in_widths", 1)
    out_widths = _ints(_get(obj, "out_widths", "list", where), f"{where}.out_widths", 1)
    for name, widths in (("in_widths", in_widths), ("out_widths", out_widths)):
        if not widths or list(widths) != sorted(set(widths)):
            raise _bad(f"{where}.{name} must be increasing, got {list(widths)}")
    ms = _get(obj, "ms", "list", where)
    noisy = _get(obj, "noisy", "list", where)
    shape_ok = len(ms) == len(in_widths) == len(noisy) and all(
        isinstance(r, list) and isinstance(n, list) and len(r) == len(out_widths) == len(n)
        for r, n in zip(ms, noisy, strict=False)
    )
    if not shape_ok:
        raise _bad(f"{where}.ms must be a {len(in_widths)} x {len(out_widths)} grid (as noisy)")
    values = [v for row in ms for v in row]
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in values
    ):
        raise _bad(f"{where}.ms holds something other than non-negative milliseconds")
    if not all(isinstance(v, bool) for row in noisy for v in row):
        raise _bad(f"{where}.noisy must hold true/false")
    slots = []
    for key in ("in_slot", "out_slot"):
        slot = obj.get(key)
        if slot is not None and (type(slot) is not int or slot < 0):
            raise _bad(f"{where}.{key} must be a slot index or null, got {slot!r}")
        slots.append(slot)
    return LayerTable(
        term=_get(obj, "term", "int", where),
        label=_get(obj, "label", "str", where),
        kind=_get(obj, "kind", "str", where),
        module_type=_get(obj, "module_type", "str", where),
        input_shape=_ints(_get(obj, "input_shape", "list", where), f"{where}.input_shape", 1),
        in_slot=slots[0],
        out_slot=slots[1],
        in_widths=in_widths,
        out_widths=out_widths,
        ms=tuple(tuple(float(v) for v in row) for row in ms),
        noisy=tuple(tuple(row) for row in noisy),
        out_spatial=_positive_int(obj, "out_spatial", where),
    )


def _positive_int(obj: Any, key: str, where: str) -> int:
    value = _get(obj, key, "int", where)
    if value < 1:
        raise _bad(f"{where}.{key} must be >= 1, got {value}")
    return int(value)


def _residual_points(data: Any) -> tuple[tuple[float, float], ...]:
    points = _get(data, "residual_points", "list", "the table")
    if not all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
        for p in points
    ):
        raise _bad("residual_points must be a list of [activations fraction, residual ms] pairs")
    return tuple((float(a), float(r)) for a, r in points)


def table_from_json(data: Any) -> LatencyTable:
    """A table from its parsed JSON (see :func:`prune_env.serialize.loads_strict`); every field is checked
    and anything missing, mistyped or inconsistent is a :class:`LatencyTableError`."""
    if not isinstance(data, dict):
        raise _bad("the file does not hold a JSON object")
    if data.get("format") != TABLE_FORMAT:
        raise _bad(f"format {data.get('format')!r}, this version reads format {TABLE_FORMAT}")
    m = _get(data, "meta", "object", "the table")
    shapes = _get(m, "input_shape", "list", "meta")
    meta = TableMeta(
        model=m.get("model") if isinstance(m.get("model"), str) else None,
        model_hash=_get(m, "model_hash", "str", "meta"),
        input_shape=tuple(_ints(s, "meta.input_shape", 1) for s in shapes),
        batch=_get(m, "batch", "int", "meta"),
        device=_get(m, "device", "str", "meta"),
        device_name=_get(m, "device_name", "str", "meta"),
        threads=_get(m, "threads", "int", "meta"),
        torch=_get(m, "torch", "str", "meta"),
        format=_get(m, "format", "int", "meta"),
    )
    if m.get("residual_rule") != RESIDUAL_RULE:
        raise _bad(f"residual rule {m.get('residual_rule')!r}, this version predicts with {RESIDUAL_RULE!r}")
    layers = tuple(
        _layer(obj, f"layers[{i}]") for i, obj in enumerate(_get(data, "layers", "list", "the table"))
    )
    untimed = _get(data, "untimed", "list", "the table")
    if not all(isinstance(u, str) for u in untimed):
        raise _bad("untimed must be a list of module names")
    table = LatencyTable(
        meta=meta,
        layers=layers,
        untimed=tuple(untimed),
        whole=_timing(_get(data, "whole", "object", "the table"), "whole"),
        noise=float(_get(data, "noise", "number", "the table")),
        protocol=_get(data, "protocol", "object", "the table"),
        residual_slope_ms=float(_get(data, "residual_slope_ms", "number", "the table")),
        residual_points=_residual_points(data),
    )
    if table.residual_slope_ms < 0:
        raise _bad(f"residual_slope_ms {table.residual_slope_ms} is negative")
    stored = float(_get(data, "residual_ms", "number", "the table"))
    if not math.isclose(stored, table.residual_ms, rel_tol=1e-9, abs_tol=1e-9):
        raise _bad(f"residual_ms {stored} is not whole - sum(layers) = {table.residual_ms} (edited?)")
    return table


__all__ = ["table_from_json", "table_to_json"]
