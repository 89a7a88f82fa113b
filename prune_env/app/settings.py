"""What ``prune-env search`` is asked to do: one frozen dataclass, from which the CLI's options are made.

:class:`SearchSettings` holds the run's own settings (where, which model and data, which agent, how many
evaluations, the fine-tune) and, whole, the :class:`~prune_env.settings.ProblemSettings` of the problem it
searches. :func:`add_options` turns every field of both into a command-line option with the same default
and help, so the command line exposes every setting and never restates a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prune_env.errors import InvalidSettingError, RunDirectoryError
from prune_env.optional_ray import uses_ray
from prune_env.settings import ProblemSettings, option_help
from prune_env.validation import check_settings

T = TypeVar("T")

# Problem settings a resumed run may change: where it runs, its bars, and how its final model's latency is
# measured and held (after the search, which they do not touch).
RESUMABLE_PROBLEM_SETTINGS = ("device", "progress", "latency_rounds", "latency_guard")

# The first one that can run is the default: evolution spends its budget near the target at a fraction of
# an SB3 learner's overhead per evaluation, so the README's default run stays within minutes on 2 cores.
DEFAULT_AGENTS = ("evolution", "ppo", "random")


@dataclass(frozen=True)
class SearchSettings:
    """Everything ``prune-env search`` was asked to do."""

    out: Path = field(default=Path("runs/quickstart"), metadata=option_help("run directory"))
    model: str = field(
        default="resnet20",
        metadata=option_help(
            "zoo name, tv:NAME or timm:NAME (see `prune-env list`); tv:NAME@WEIGHTS or timm:NAME@pretrained "
            "starts training from published weights found in the local cache"
        ),
    )
    dataset: str = field(default="digits", metadata=option_help("dataset name (see `prune-env list`)"))
    image_size: int = field(
        default=32, metadata=option_help("image side in pixels for imagefolder:PATH datasets")
    )
    agent: str | None = field(
        default=None,
        metadata=option_help(f"search method (default: the first available of {DEFAULT_AGENTS})"),
    )
    agent_settings: Mapping[str, Any] = field(
        default_factory=dict,
        metadata=option_help("the agent's settings, KEY=VALUE (VALUE as JSON, else a string); repeatable"),
    )
    weights: Path | None = field(
        default=None,
        metadata=option_help(
            "trained weights of --model for this dataset (a state_dict file, torch.save(model.state_dict(), "
            "PATH)): the base model is taken as trained instead of trained here"
        ),
    )
    budget_range: tuple[float, float] | None = field(
        default=None,
        metadata=option_help(
            "train one policy for every target in LO HI (budget-conditioned SB3 learners): episodes draw "
            "their target from the range, the policy is saved in the run (RUN/policy) and `prune-env apply` "
            "prunes for any target in it without new evaluations; --target-macs (or --target-params) must "
            "lie in the range, the run's model is made for it"
        ),
    )
    evals: int = field(default=100, metadata=option_help("evaluation budget"))
    workers: int | None = field(
        default=None,
        metadata=option_help(
            "score the batches the agent proposes on N Ray actors (pip install 'prune-env[ray]'); the search "
            "is the same as without, only faster"
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=option_help(
            'a Ray cluster to score on ("auto", ray://HOST:10001); default: Ray on this machine'
        ),
    )
    reward: str = field(default="acc", metadata=option_help("reward preset (see `prune-env list`)"))
    finetune_epochs: int = field(default=3, metadata=option_help("KD fine-tune epochs of the best policy"))
    resume: bool = field(default=False, metadata=option_help("continue the run in --out"))
    problem: ProblemSettings = field(default_factory=ProblemSettings)
    argv: tuple[str, ...] = field(
        default=(), metadata={"cli": False}
    )  # the command line, for the resume hint

    def __post_init__(self) -> None:
        # An empty --out would become Path("."): the current directory, which the user did not name.
        if not str(self.out).strip():
            raise RunDirectoryError("--out is empty; name the run directory, e.g. --out runs/my-run")
        object.__setattr__(self, "out", Path(self.out))
        if self.weights is not None:
            if not str(self.weights).strip():
                raise InvalidSettingError("--weights is empty; pass the path of a state_dict file")
            weights = Path(self.weights).expanduser()
            if not weights.is_file():
                raise InvalidSettingError(
                    f"--weights {weights}: no such file; pass a state_dict saved with "
                    "torch.save(model.state_dict(), PATH)"
                )
            object.__setattr__(self, "weights", weights)
        check_settings(
            {
                "evals": self.evals,
                "finetune_epochs": self.finetune_epochs,
                "resume": self.resume,
                "workers": self.workers,
                "image_size": self.image_size,
                "ray_address": self.ray_address,
            },
            option_style=True,
        )
        # Ray missing, an address that does not answer, more workers than cores: said before any work.
        uses_ray(self.workers, self.ray_address, option_style=True)
        # The budget is checked by ProblemSettings itself (from_options words it as options).
        if not isinstance(self.problem, ProblemSettings):
            raise InvalidSettingError("problem must be a ProblemSettings")
        if self.budget_range is not None:
            check_settings({"budget_range": self.budget_range}, option_style=True)
            lo, hi = (float(b) for b in self.budget_range)
            object.__setattr__(self, "budget_range", (lo, hi))
            if not lo <= self.problem.target <= hi:
                raise InvalidSettingError(
                    f"the target {self.problem.target:g} lies outside --budget-range {lo:g} {hi:g}; the run's "
                    "model is made for the target, so choose one in the range"
                )
            if self.resume:
                raise InvalidSettingError(
                    "a --budget-range run cannot be resumed (its log does not record each evaluation's "
                    "target); start it again with another --out"
                )
        if not isinstance(self.agent_settings, Mapping):
            raise InvalidSettingError("agent_settings must be a mapping of setting names to values")

    @property
    def parallel(self) -> bool:
        """Whether proposals are scored on Ray actors (several workers, or a cluster)."""
        return uses_ray(self.workers, self.ray_address)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (the budget and fine-tune may change)."""
        problem = {
            f.name: getattr(self.problem, f.name)
            for f in dataclasses.fields(self.problem)
            if f.name not in RESUMABLE_PROBLEM_SETTINGS
        }
        return {
            "model": self.model,
            "dataset": self.dataset,
            "image_size": self.image_size,
            "weights": None if self.weights is None else str(self.weights),
            "budget_range": None if self.budget_range is None else list(self.budget_range),
            "agent": self.agent,
            "agent_settings": dict(self.agent_settings),
            "reward": self.reward,
            **problem,
        }


# ------------------------------------------------------------------------------------------------ options


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> type:
    """The non-None type of a field annotation such as ``float | None`` (``str`` when it is not simple)."""
    hint = annotation
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next((a for a in args if a is not type(None)), str)
    # A path stays text until the settings check it: Path("") would silently become ".".
    return hint if hint in (int, float, str, bool) else str


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value  # a bare string
    return key.strip(), parsed


def _settings_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The fields of a settings class that are options, with their resolved type annotations."""
    hints = typing.get_type_hints(cls)
    return [
        (f, hints[f.name])
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True) and hints[f.name] is not ProblemSettings
    ]


def _add_field(parser: Any, f: dataclasses.Field[Any], annotation: Any, default: Any) -> None:
    help_text = f.metadata.get("help", "")
    if f.name == "agent_settings":
        parser.add_argument(
            "--agent-setting", dest=f.name, action="append", type=_key_value, default=None, help=help_text
        )
        return
    if f.name == "budget_range":
        parser.add_argument(
            _option(f.name), dest=f.name, nargs=2, type=float, metavar=("LO", "HI"), default=default,
            help=help_text,
        )  # fmt: skip
        return
    kind = _scalar_type(annotation)
    if kind is bool:
        parser.add_argument(
            _option(f.name),
            dest=f.name,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=help_text,
        )
        return
    shown = "" if default is None else f" (default {default})"
    parser.add_argument(_option(f.name), dest=f.name, type=kind, default=default, help=help_text + shown)


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of :class:`SearchSettings` and of its :class:`ProblemSettings`, with the
    fields' defaults and help."""
    run_defaults, problem_defaults = SearchSettings(), ProblemSettings()
    for f, annotation in _settings_fields(SearchSettings):
        _add_field(parser, f, annotation, getattr(run_defaults, f.name))
    group = parser.add_argument_group("problem settings")
    for f, annotation in _settings_fields(ProblemSettings):
        _add_field(group, f, annotation, getattr(problem_defaults, f.name))


def add_settings_options(parser: Any, cls: type) -> None:
    """One option per field of the settings dataclass ``cls`` (``--field-name``), with its default and the
    help in the field's metadata."""
    # The fields' declared defaults: making an instance could check them against the machine (a device),
    # which --help must not wait for.
    for f, annotation in _settings_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        _add_field(parser, f, annotation, default)


def settings_from_options(args: argparse.Namespace, cls: type[T]) -> T:
    """The ``cls`` of parsed options added by :func:`add_settings_options`; a refused value is named as the
    option the user typed (``--batch must be ...``)."""
    names = [f.name for f, _ in _settings_fields(cls)]
    try:
        return cls(**{name: getattr(args, name) for name in names})
    except InvalidSettingError as exc:
        message = str(exc)
        for name in names:
            if message.startswith(f"{name} "):
                message = _option(name) + message[len(name) :]
                break
        raise InvalidSettingError(message) from None


def from_options(args: argparse.Namespace, argv: tuple[str, ...] = ()) -> SearchSettings:
    """The :class:`SearchSettings` of parsed options (see :func:`add_options`)."""
    values = {f.name: getattr(args, f.name) for f, _ in _settings_fields(ProblemSettings)}
    check_settings(values, option_style=True)  # the same rules, worded as options
    problem = ProblemSettings(**values)
    run = {f.name: getattr(args, f.name) for f, _ in _settings_fields(SearchSettings)}
    run["agent_settings"] = dict(run["agent_settings"] or [])
    return SearchSettings(**run, problem=problem, argv=argv)


__all__ = [
    "DEFAULT_AGENTS",
    "SearchSettings",
    "add_options",
    "add_settings_options",
    "from_options",
    "settings_from_options",
]
