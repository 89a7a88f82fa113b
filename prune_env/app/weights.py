"""A user's ``--weights``: a state_dict file read weights-only (never unpickled), checked and loaded into the
zoo architecture the run names, or refused naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prune_env.app.settings import SearchSettings
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """``--weights`` read as a saved model's weights are: weights-only, plain tensors, all finite."""
    from prune_env.errors import CheckpointError
    from prune_env.trusted_files import read_weights

    save = "save one with torch.save(model.state_dict(), PATH)"
    resolved = Path(path).resolve()  # a link to the user's own file is fine; read_weights checks its target
    if not resolved.exists():
        raise InvalidSettingError(f"--weights {path}: no such file; {save}")
    try:
        return read_weights(resolved)
    except CheckpointError as exc:
        # "<file> <problem>; <how to re-save a saved model>": the problem is kept, the advice replaced.
        problem = (str(exc).rpartition("; ")[0] or str(exc)).removeprefix(str(resolved))
    if problem.startswith(": tensor"):  # NaN or inf: the file reads, its values are unusable
        raise InvalidSettingError(f"--weights {path}{problem}; pass weights whose training did not diverge")
    problem = f"the file{problem}" if problem.startswith(" ") else problem
    raise InvalidSettingError(f"--weights {path} is not a loadable state_dict ({problem}); {save}")


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a state_dict file into ``model`` (in place), or refuse it naming the problem and the fix."""
    state = _read_weights_file(path)
    # load_state_dict would cast without a word: float64 weights rounded, integer tensors taken as weights,
    # half precision widened. A file of another dtype is refused, with the conversion to run if it is meant.
    expected = model.state_dict()
    wrong = [
        (k, v.dtype, expected[k].dtype)
        for k, v in state.items()
        if k in expected and v.dtype != expected[k].dtype
    ]
    if wrong:
        key, found, wanted = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise InvalidSettingError(
            f"--weights {path} holds {key} as {str(found).removeprefix('torch.')}{more} where the model has "
            f"{str(wanted).removeprefix('torch.')}; if these are the weights you mean, convert them first: "
            "torch.save({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, PATH)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()  # torch's first line is a heading; the second names the keys
        first = lines[1 if len(lines) > 1 else 0].strip()
        raise InvalidSettingError(
            f"--weights {path} does not fit {type(model).__name__} built for this dataset's classes and "
            f"channels ({first[:160]}); pass the weights of --model trained on --dataset"
        ) from None
    return model


def base_model_spec(s: SearchSettings, splits: Splits) -> str | nn.Module:
    """The model the problem starts from: the zoo name (trained and cached), or it with --weights loaded."""
    if s.weights is None:
        return s.model
    from prune_env.models import get_model

    return load_weights(get_model(s.model, splits.num_classes, splits.in_channels), s.weights).eval()


__all__ = ["base_model_spec", "load_weights"]
