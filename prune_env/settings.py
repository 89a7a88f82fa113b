"""The settings of a pruning problem: one frozen dataclass, its defaults in one place.

:class:`ProblemSettings` says how a :class:`~prune_env.problem.PruningProblem` is built and scored: the
budget, the rounding and limits of the budget projection, the channel ranking and the proxy. Values are
plain (numbers, strings, ``None``), so the same object serves a Python caller, ``gym.make`` keyword
arguments (picklable, recorded in the env spec), a run's state file and the command line, whose options
are generated from these fields. Variations are made with :func:`dataclasses.replace`; every value is
checked by :mod:`prune_env.validation` when the object is made.

This module imports neither torch nor the rest of the library, so a command's ``--help`` can describe
every setting without loading them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prune_env.errors import InvalidSettingError
from prune_env.validation import TARGETS, check_settings

# The budget when none is given: half the base model's MACs.
DEFAULT_TARGET = 0.5
# Never remove more than this fraction of any group: leaves every layer enough channels to recover.
DEFAULT_MAX_RATIO = 0.8

# Proxy defaults, chosen from benchmarks/proxy_fidelity.py (resnet20, Fashion-MNIST, random policies at 25%
# MACs; raw data in benchmarks/results). Kendall tau of the proxy's accuracy against test accuracy after a
# 1-epoch KD fine-tune on 20k images (mean of 3 seeds; seeds agree with each other to tau 0.84):
#   plain -0.20, BN recalibration 0.45, + 10 KD steps + recalibration again 0.29, + 25 steps 0.53,
#   + 50 steps 0.77, + 100 steps 0.79; with 3000 validation samples: 50 steps 0.80 (10 s per evaluation on
#   one CPU thread, a tenth of one fine-tune), 100 steps 0.78 (14.5 s).
# ProxyEvaluator's own default is the cheapest variant that reached 0.8: 8 BN batches + 50 KD steps +
# re-recalibration on 3000 samples. On 20 held-out policies (2-seed truth, seeds agreeing to only 0.75) it
# ranks at 0.65 and the 100-step variant at 0.75: at this budget a proxy ranks about as well as another
# fine-tune would. At 50% MACs fine-tuned random policies all land within 0.4 points (ranking there is
# noise); on digits every variant is at the noise floor (360 test images).
# ProxyEvaluator's own sample count (a problem's default is FAST_EVAL_SAMPLES, below).
EVALUATOR_EVAL_SAMPLES = 3000
DEFAULT_BN_RECALIB_BATCHES = 8
DISTILLATION_STEPS = 50  # KD steps of the "distillation" proxy and of ProxyEvaluator by default
# A problem's and the environments' default: recalibration only (no KD steps) on 1000 samples, ~10x
# cheaper per evaluation, for searches that need many evaluations more than the last bit of fidelity.
FAST_EVAL_SAMPLES = 1000
# Distillation steps a supernet or PruningNet proxy takes on the scored sub-network (from its trained
# weights) when finetune_steps is not given. Kendall tau of the supernet (resnet20, Fashion-MNIST, 25% MACs;
# 30 policies / 20 held-out) and its seconds per evaluation relative to recalibration alone in the same
# run: 0 steps 0.66 / 0.58 (1.0x), 3 steps 0.70 / 0.70 (1.9x), 4: 0.78 / 0.58, 5: 0.75 / 0.63 (2.2x),
# 8: 0.76 / 0.69 (2.5x), 10: 0.78 / 0.62 (2.8x). 3 is the most consistent within twice the default's cost.
DEFAULT_SUPERNET_FINETUNE_STEPS = 3
# Budgets on quantized models: BitOps and size (prune_env.quantization).
JOINT_METRICS = ("bitops", "size")
# Proxies trained once per problem (prune_env.supernet), besides the evaluator's recalibration/distillation.
TRAINED_PROXIES = ("supernet", "pruningnet")


def option_help(text: str) -> dict[str, str]:
    """Field metadata holding an option's help text (the command line is generated from the fields)."""
    return {"help": text}


@dataclass(frozen=True)
class ProblemSettings:
    """How a pruning problem is built and scored (see :class:`~prune_env.problem.PruningProblem`)."""

    target_macs: float | None = field(
        default=None,
        metadata=option_help(f"MACs budget as a fraction of the base model's (default {DEFAULT_TARGET})"),
    )
    target_params: float | None = field(
        default=None,
        metadata=option_help("parameter budget as a fraction of the base model's (instead of MACs)"),
    )
    target_bitops: float | None = field(
        default=None,
        metadata={
            "cli": False,
            **option_help(
                "BitOps budget (MACs x weight bits x activation bits) as a fraction of the base model's at 32 bits"
            ),
        },
    )
    target_size: float | None = field(
        default=None,
        metadata={
            "cli": False,
            **option_help("size budget (parameter bits) as a fraction of the base model's at 32 bits"),
        },
    )
    target_latency: float | None = field(
        default=None,
        metadata=option_help(
            "latency budget as a fraction of the base model's latency, predicted from a latency table "
            "measured on this machine at --latency-batch (instead of MACs)"
        ),
    )
    latency_batch: int = field(
        default=1,
        metadata=option_help("batch size a latency budget is measured and predicted at"),
    )
    latency_threads: int = field(
        default=1,
        metadata=option_help("CPU threads a latency budget is measured and predicted with"),
    )
    latency_rounds: int = field(
        default=1,
        metadata=option_help(
            "times the final model of a latency budget is measured, each time with the unpruned model "
            "right after it; the round of median speed-up is reported (one measurement's spread understates "
            "how far two measurements of one model differ)"
        ),
    )
    latency_guard: bool = field(
        default=False,
        metadata=option_help(
            "measure the chosen policy before its fine-tune and, while it runs above the latency target by "
            "more than the table's protocol noise, lower the predicted budget by the measured overshoot and "
            "project the policy onto it (at most 3 times): the budget then holds on the machine, not only "
            "in the table"
        ),
    )
    quantize: bool = field(
        default=False,
        metadata={
            "cli": False,
            **option_help(
                "joint policies: per group, a pruning ratio and the bits of its layers' weights and inputs "
                "(implied by target_bitops and target_size)"
            ),
        },
    )
    other_bits: int = field(
        default=8,
        metadata={
            "cli": False,
            **option_help("bits of the convolutions and linear layers outside every group"),
        },
    )
    max_ratio: float = field(
        default=DEFAULT_MAX_RATIO, metadata=option_help("largest fraction of any group's channels removed")
    )
    round_to: int = field(
        default=1,
        metadata=option_help(
            "kept channel counts are rounded to multiples of this (refused if too coarse for max_ratio)"
        ),
    )
    fill_budget: bool = field(
        default=True,
        metadata=option_help(
            "spend the budget: scale back policies that prune more than the target needs (one-shot learners "
            "otherwise leave budget unused: TD3 and A2C kept 0.47 of a 0.5 MACs target)"
        ),
    )
    importance: str | Callable[..., Any] = field(
        default="l1",
        metadata=option_help(
            "channel ranking: l1, l2, bn_scale, fpgm, random, or from training data taylor, hrank"
        ),
    )
    eval_samples: int | None = field(
        default=FAST_EVAL_SAMPLES, metadata=option_help("validation samples per proxy evaluation")
    )
    bn_recalib_batches: int = field(
        default=DEFAULT_BN_RECALIB_BATCHES,
        metadata=option_help("training batches for BatchNorm recalibration"),
    )
    finetune_steps: int | None = field(
        default=None,
        metadata=option_help(
            "knowledge-distillation steps per proxy evaluation (default: the proxy's own: none for "
            f"recalibration, {DISTILLATION_STEPS} for distillation, "
            f"{DEFAULT_SUPERNET_FINETUNE_STEPS} for supernet and pruningnet)"
        ),
    )
    proxy: str = field(
        default="recalibration",
        metadata=option_help(
            "how pruned models are scored: recalibration (BatchNorm recalibration), distillation "
            "(recalibration + distillation steps), supernet (Stage-wise Pruning's weight-sharing supernet) "
            "or pruningnet (MetaPruning's weight-generating network); the last two are trained once per "
            "problem and cached, and score a sub-network with its trained weights (recalibration + "
            "distillation steps)"
        ),
    )
    proxy_steps: int | None = field(
        default=None,
        metadata=option_help("training steps of a supernet or pruningnet proxy (default: 1000)"),
    )
    seed: int = field(default=0, metadata=option_help("seeds the data split, base training and the proxy"))
    device: str | None = field(
        default=None, metadata=option_help("cpu, cuda, cuda:1... (default: cuda if available)")
    )
    progress: bool = field(default=True, metadata=option_help("progress bars"))

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        check_settings({k: v for k, v in values.items() if k not in ("importance", "device")})
        if self.proxy_steps is not None and self.proxy not in TRAINED_PROXIES:
            raise InvalidSettingError(
                f"proxy_steps={self.proxy_steps} trains a proxy, but proxy={self.proxy!r} is not trained; "
                f"use proxy='supernet' or 'pruningnet', or leave proxy_steps unset"
            )
        if not (isinstance(self.importance, str) or callable(self.importance)):
            raise InvalidSettingError(
                f"importance must be a name or a callable (group, model) -> scores, got {self.importance!r}"
            )
        self._check_latency()
        if self.device is not None and not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))  # a torch.device, kept as its name

    def _check_latency(self) -> None:
        """The latency settings say how a latency budget is measured: without one they would be ignored,
        and a latency table times float models, not quantized ones."""
        if self.target_latency is None:
            changed = [
                f"{f.name}={getattr(self, f.name)}"
                for f in dataclasses.fields(self)
                if f.name.startswith("latency_") and getattr(self, f.name) != f.default
            ]
            if changed:
                raise InvalidSettingError(
                    f"{' and '.join(changed)} would be ignored: they say how a latency budget is measured "
                    "and held; give target_latency, or leave them at their defaults"
                )
        elif self.quantize:
            raise InvalidSettingError(
                "a latency budget is predicted from a table measured on the float model, which says nothing "
                "of quantized layers: drop quantize, or give a BitOps, size, MACs or parameter budget"
            )

    @property
    def metric(self) -> str:
        """What the budget constrains: ``"macs"``, ``"params"``, ``"bitops"``, ``"size"`` or ``"latency"``."""
        for name in TARGETS[1:]:
            if getattr(self, name) is not None:
                return name.removeprefix("target_")
        return "macs"

    @property
    def target(self) -> float:
        """The budget as a fraction of the base model's cost in :attr:`metric` (at 32 bits for BitOps and
        size; the predicted = measured latency at ``latency_batch`` for latency)."""
        given = getattr(self, f"target_{self.metric}")
        return DEFAULT_TARGET if given is None else given

    @property
    def joint(self) -> bool:
        """Whether policies choose bits as well as channels (``quantize``, or a BitOps or size budget)."""
        return self.quantize or self.metric in JOINT_METRICS

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], base: ProblemSettings | None = None) -> ProblemSettings:
        """``base`` (default: the defaults) with ``kwargs`` replaced; unknown keys are refused."""
        return replace_checked(base or cls(), kwargs, "PruningProblem")


def replace_checked(settings: Any, changes: Mapping[str, Any], owner: str) -> Any:
    """:func:`dataclasses.replace` that names unknown keys and lists the known ones."""
    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise InvalidSettingError(
            f"{owner} has no setting {', '.join(unknown)}; its settings are: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(settings, **changes)


__all__ = [
    "DEFAULT_BN_RECALIB_BATCHES",
    "DEFAULT_MAX_RATIO",
    "DEFAULT_SUPERNET_FINETUNE_STEPS",
    "DEFAULT_TARGET",
    "DISTILLATION_STEPS",
    "EVALUATOR_EVAL_SAMPLES",
    "FAST_EVAL_SAMPLES",
    "TRAINED_PROXIES",
    "ProblemSettings",
    "option_help",
    "replace_checked",
]
