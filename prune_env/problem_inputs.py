"""The checks a :class:`~prune_env.problem.PruningProblem` makes of its arguments, before any data is loaded
or a model trained: the model argument, a given proxy, the dataset-free mode, and the base model's output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prune_env.batches import model_output
from prune_env.errors import InvalidSettingError
from prune_env.importance import DATA_DRIVEN
from prune_env.proxy import Proxy
from prune_env.settings import ProblemSettings


def check_model_arg(model: Any) -> None:
    """A zoo name, an ``nn.Module`` or a zero-argument factory (checked before anything is built)."""
    if isinstance(model, str):
        from prune_env.models import check_model_name

        check_model_name(model)
    elif not (isinstance(model, nn.Module) or callable(model)):
        raise InvalidSettingError(
            f"model must be a zoo name, an nn.Module or a factory returning one, got {type(model).__name__}"
        )


def check_classifier(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    """The base model must be a float32 classifier of this dataset: one logits tensor per sample.

    Checked once on one example, so a model that returns a dict or tuple, has the wrong number of
    classes or another floating-point type fails here with the fix, not deep inside a proxy or a loss.
    """
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:
        found = ", ".join(sorted(str(d) for d in dtypes))
        raise InvalidSettingError(
            f"the model's floating-point tensors are {found}; prune_env trains and scores in float32: "
            "pass model.float()"
        )
    shape, channels = tuple(example.shape[1:]), example.shape[1]
    build = (
        f"build the model for this data (in_channels={channels}, num_classes={num_classes}: "
        f"get_model(name, num_classes={num_classes}, in_channels={channels}) for the zoo's models)"
    )

    def mismatch(problem: str) -> InvalidSettingError:
        return InvalidSettingError(
            f"{problem} from the dataset's inputs of shape {shape}: {build}, or give data of the shape and "
            "channels the model was built for"
        )

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        was_training = model.training
        out = model_output(model.eval(), example, mismatch)
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise InvalidSettingError(
            f"the model returns {type(out).__name__}; prune_env needs a classifier returning one logits "
            "tensor (wrap the model so its forward returns the logits)"
        )
    if tuple(out.shape) != (example.shape[0], num_classes):
        raise InvalidSettingError(
            f"the model maps one input of shape {shape} to an output of shape {tuple(out.shape[1:])}; the "
            f"dataset has {num_classes} classes, so it must be ({num_classes},): {build}"
        )


def check_given_proxy(proxy: Any, s: ProblemSettings) -> None:
    """A proxy object or factory given to a problem: of the right kind, and no setting it would ignore."""
    if not (isinstance(proxy, Proxy) or callable(proxy)):
        raise InvalidSettingError(
            "proxy must be a prune_env.proxy.Proxy or a callable building one from a ProxyContext, "
            f"got {type(proxy).__name__}"
        )
    default = ProblemSettings()
    # A proxy object scores with its own settings; a factory receives these settings, and only the choice
    # of proxy by name is then moot.
    names = ("eval_samples", "bn_recalib_batches", "finetune_steps", "proxy", "proxy_steps")
    ignored = sorted(
        name
        for name in (names if isinstance(proxy, Proxy) else ("proxy",))
        if getattr(s, name) != getattr(default, name)
    )
    if ignored:
        raise InvalidSettingError(
            f"{', '.join(ignored)} would be ignored: a given proxy scores with its own settings; "
            "set them on the proxy instead"
        )


def check_without_data(model: Any, proxy: Any, example_inputs: Any, s: ProblemSettings) -> None:
    """A problem without a dataset (``dataset=None``) is a trained model scored by the user's own proxy: it
    needs the model as a module, the proxy, an example input, and settings that read no data."""
    missing = [
        what
        for what, given in (
            ("model= as a trained nn.Module (nothing is trained without data)", isinstance(model, nn.Module)),
            ("proxy= (a MetricProxy scoring with your metric)", proxy is not None),
            (
                "example_inputs= (the model's arguments, e.g. ([image],) for a detector)",
                example_inputs is not None,
            ),
        )
        if not given
    ]
    if missing:
        raise InvalidSettingError(f"without a dataset (dataset=None) a problem needs {'; '.join(missing)}")
    data_settings = [
        f"{name}={value!r}"
        for name, value, reads in (
            ("importance", s.importance, isinstance(s.importance, str) and s.importance in DATA_DRIVEN),
            ("metric", s.metric, s.metric == "latency"),
            ("joint", s.joint, bool(s.joint)),
        )
        if reads
    ]
    if data_settings:
        raise InvalidSettingError(
            f"{', '.join(data_settings)} read(s) the dataset, and this problem has none (dataset=None): "
            "pass dataset=, or use a data-free setting (importance='l1', a MACs or parameters budget)"
        )


__all__ = ["check_classifier", "check_given_proxy", "check_model_arg", "check_without_data"]
