"""One set of rules for every public setting, checked at the boundary before any expensive work.

The environments, :class:`~prune_env.problem.PruningProblem`, the agents' :func:`agents.search`, the
benchmark harness and the CLI all call :func:`check_settings` on the settings they receive, so a value is
accepted or refused the same way everywhere, with an :class:`~prune_env.errors.InvalidSettingError` that
names the setting, the value and what is accepted. The rules are keyed by the setting's name: a setting
means the same thing wherever it is passed.

Numbers are strict: a ``bool`` is not an integer or a fraction here (``ratios=True`` pruning every
group to one channel was such a case), a float is not an integer (no silent truncation), complex values,
strings and NaN/inf are refused rather than converted.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import numpy as np

from prune_env.errors import InvalidSettingError

# The budgets a problem accepts (one at a time), as fractions of the unpruned model's cost: MACs, parameters,
# for joint pruning + quantization BitOps and size (of the full-precision model), and the latency predicted
# from a table measured on this machine (prune_env.latency).
TARGETS = ("target_macs", "target_params", "target_bitops", "target_size", "target_latency")

# numpy's and scikit-learn's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


def _label(name: str, option_style: bool) -> str:
    return "--" + name.replace("_", "-") if option_style else name


def _refuse(name: str, value: Any, accepted: str) -> NoReturn:
    raise InvalidSettingError(f"{name} must be {accepted}, got {value!r}")


def as_real(name: str, value: Any) -> float:
    """A finite real number (Python or numpy, not a bool) as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        _refuse(name, value, "a real number")
    result = float(value)
    if not math.isfinite(result):
        _refuse(name, value, "a finite number")
    return result


def as_int(name: str, value: Any) -> int:
    """An integer (Python or numpy, not a bool and not a float) as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        _refuse(name, value, "an integer")
    return int(value)


def fraction(name: str, value: Any) -> float:
    """A budget: a fraction of the base model's cost in (0, 1]."""
    result = as_real(name, value)
    if not 0.0 < result <= 1.0:
        _refuse(name, value, "a fraction in (0, 1] of the base model's cost")
    return result


def _int_at_least(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def rule(name: str, value: Any) -> int:
        result = as_int(name, value)
        if result < low or (high is not None and result > high):
            _refuse(name, value, f"an integer >= {low}" + ("" if high is None else f" and <= {high}"))
        return result

    return rule


def int_at_least(name: str, value: Any, low: int) -> int:
    """An integer (not a bool) of at least ``low``, for an argument without a rule of its own name."""
    return _int_at_least(low)(name, value)


def _real_within(low: float, high: float) -> Callable[[str, Any], float]:
    def rule(name: str, value: Any) -> float:
        result = as_real(name, value)
        if not low <= result <= high:
            _refuse(name, value, f"a number in [{low:g}, {high:g}]")
        return result

    return rule


def _optional(rule: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        return None if value is None else rule(name, value)

    return check


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        _refuse(name, value, "True or False")
    return bool(value)


def _choice(*options: str) -> Callable[[str, Any], str]:
    def rule(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            _refuse(name, value, "one of " + ", ".join(repr(o) for o in options))
        return value

    return rule


def budget_range(name: str, value: Any) -> tuple[float, float]:
    """``(low, high)``: two budgets with ``low <= high``."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != 2:
        _refuse(name, value, "a pair (low, high) of fractions in (0, 1]")
    low, high = (fraction(name, v) for v in value)
    if low > high:
        _refuse(name, value, "a pair (low, high) with low <= high")
    return low, high


# HOST:PORT of a Ray cluster, with "ray://" for Ray Client. The port is required: without one Ray Client's
# gRPC channel would dial port 443, which no Ray process listens on.
_RAY_ADDRESS = re.compile(
    r"^(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>\d{1,5})$"
)


def ray_host_port(address: str) -> tuple[str, int] | None:
    """The host and port a Ray address (already checked) names; None for ``"auto"``."""
    match = _RAY_ADDRESS.match(address)
    if match is None:
        return None
    return match["host"].strip("[]"), int(match["port"])


def ray_address(name: str, value: Any) -> str | None:
    """A Ray cluster's address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) or None."""
    if value is None:
        return None
    address = value.strip() if isinstance(value, str) else ""
    host_port = ray_host_port(address)
    if address != "auto" and (host_port is None or not 0 < host_port[1] < 65536):
        _refuse(
            name,
            value,
            'a Ray address: "auto", HOST:PORT (a cluster\'s head node, e.g. 10.0.0.5:6379) or ray://HOST:PORT '
            "(Ray Client, e.g. ray://10.0.0.5:10001); leave it unset to run Ray on this machine",
        )
    return address


def bits(name: str, value: Any) -> int:
    """Bits of a fixed-point format, 2..16, or 32 (full precision: left in floating point)."""
    result = as_int(name, value)
    if not (2 <= result <= 16 or result == 32):
        _refuse(name, value, "a number of bits in 2..16, or 32 for full precision")
    return result


def max_ratio(name: str, value: Any) -> float:
    """The largest fraction of a group that may be removed, in (0, 1] (one channel always stays)."""
    result = as_real(name, value)
    if not 0.0 < result <= 1.0:
        _refuse(name, value, "a fraction in (0, 1] of a group's channels")
    return result


def close_names(name: str, known: Iterable[str], count: int = 3) -> list[str]:
    """The ``count`` names of ``known`` nearest ``name`` (a misspelt module or layer name's candidates)."""
    return difflib.get_close_matches(name, list(known), n=count, cutoff=0.6)


RULES: dict[str, Callable[[str, Any], Any]] = {
    "target": fraction,
    "target_macs": _optional(fraction),
    "target_params": _optional(fraction),
    "target_bitops": _optional(fraction),
    "target_size": _optional(fraction),
    "target_latency": _optional(fraction),
    # A latency budget's measurement: a batch and a thread count (the cores are checked when it is measured).
    "latency_batch": _int_at_least(1),
    "latency_threads": _int_at_least(1),
    "latency_rounds": _int_at_least(1),
    "latency_guard": flag,
    "quantize": flag,
    "other_bits": bits,
    "budget_range": _optional(budget_range),
    "metric": _choice("macs", "params", "latency"),
    "max_ratio": max_ratio,
    "round_to": _int_at_least(1),
    "fill_budget": flag,
    "eval_samples": _optional(_int_at_least(1)),
    "bn_recalib_batches": _int_at_least(0),
    "finetune_steps": _optional(_int_at_least(0)),
    "finetune_epochs": _int_at_least(0),
    "finetune_samples": _optional(_int_at_least(1)),
    "proxy": _choice("recalibration", "distillation", "supernet", "pruningnet"),
    "proxy_steps": _optional(_int_at_least(0)),
    "steps": _int_at_least(0),
    "batch_size": _int_at_least(1),
    "epochs": _int_at_least(1),
    "num_classes": _int_at_least(2),  # a detector's, the background counted
    "max_objects": _int_at_least(1),
    "random_subnets": _int_at_least(0),
    "meta_hidden": _int_at_least(1),
    "macs_band": _optional(budget_range),
    "lr": _real_within(0.0, math.inf),
    "weight_decay": _real_within(0.0, math.inf),
    "temperature": _real_within(0.0, math.inf),
    "alpha": _real_within(0.0, 1.0),
    "evals": _int_at_least(1),
    "budget_evals": _int_at_least(1),
    "seed": _int_at_least(0, MAX_SEED),
    "success_tolerance": _real_within(0.0, 1.0),
    "use_sensitivity": flag,
    "progress": flag,
    "resume": flag,
    "workers": _optional(_int_at_least(1)),
    # An image folder's side in pixels; the cap keeps a typo from allocating gigabytes per image.
    "image_size": _int_at_least(1, 4096),
    "ray_address": ray_address,
}


def check_settings(settings: Mapping[str, Any], *, option_style: bool = False) -> dict[str, Any]:
    """Check every setting that has a rule (others pass through); returns the normalised values.

    ``option_style``: name settings as command-line options (``--max-ratio``) in error messages.
    """
    checked = dict(settings)
    for name, value in settings.items():
        rule = RULES.get(name)
        if rule is not None:
            checked[name] = rule(_label(name, option_style), value)
    given = [n for n in TARGETS if checked.get(n) is not None]
    if len(given) > 1:
        named = " and ".join(_label(n, option_style) for n in given)
        raise InvalidSettingError(f"give one budget, not {named}")
    return checked


def check_sequence(name: str, values: Any, rule_name: str) -> list[Any]:
    """Every item of a non-empty sequence under the rule of ``rule_name`` (a grid's targets, seeds)."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        _refuse(name, values, "a non-empty sequence")
    items = list(values)
    if not items:
        _refuse(name, values, "a non-empty sequence")
    rule = RULES[rule_name]
    return [rule(f"{name}[{i}]", v) for i, v in enumerate(items)]


__all__ = [
    "MAX_SEED",
    "RULES",
    "as_int",
    "as_real",
    "check_sequence",
    "check_settings",
    "fraction",
    "int_at_least",
    "ray_host_port",
]
