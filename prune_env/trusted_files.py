"""Files a user hands over, read without running anything they carry: regular files only (never through a
symbolic link, a device or a FIFO), and torch weights read weights-only, plain finite tensors.

Saved models (:mod:`prune_env.checkpoint`), ``--weights`` files, published weights in the hub caches
(:mod:`prune_env.models.pretrained`) and quantized exports all read their files here.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch

from prune_env.errors import CheckpointError


@contextlib.contextmanager
def open_regular(path: Path, what: str) -> Iterator[IO[bytes]]:
    """``path`` opened for reading, provided it is a regular file and not a symbolic link.

    A saved model directory holds regular files only: a link could point the loader at any file on the
    machine (or at a device or FIFO that never ends). The file is opened without following links and
    checked again on the open descriptor, so it cannot be swapped for a link in between.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the saved model directory is incomplete") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise CheckpointError(
            f"{path} is a symbolic link; a saved model directory must hold the {what} as a regular file "
            "(copy the file itself there)"
        )
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file; expected the {what}")
    flags = (
        os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise CheckpointError(f"{path} is not a regular file; expected the {what}")
        yield fh


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``weights``: plain tensors only, all finite. Raises :class:`CheckpointError`."""
    with open_regular(weights, "weights file") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise CheckpointError(f"{weights} is empty: the save did not finish; re-save the model")
        try:
            # A damaged or hostile file makes torch's reader fail in many ways (UnpicklingError for
            # anything but tensors and containers, RuntimeError for a broken zip archive, EOFError or
            # KeyError for truncated or foreign bytes, ...): each means the file is unusable. The
            # warnings torch emits on the way would only add noise to the one-line error.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message advises retrying with weights_only=False: exactly what must not happen.
            raise CheckpointError(
                f"{weights} is not a plain weights file: torch's weights-only reader refused it (it holds "
                "pickled objects other than tensors, or is not a weights file at all), and it will not be "
                "loaded, since unpickling it could run code; re-save the model with save_pruned"
            ) from None
        except Exception as exc:
            first = " ".join(str(exc).split())[:160] or "no details"
            raise CheckpointError(
                f"{weights} is damaged or truncated, not a readable torch weights file "
                f"({type(exc).__name__}: {first}); re-save the model"
            ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{weights} does not hold a state_dict (a mapping of names to tensors), got "
            f"{type(state).__name__}; re-save the model with save_pruned"
        )
    for name, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{weights}: tensor {name!r} holds NaN or infinite values, so the model's outputs would be "
                "meaningless; re-save it from a model whose training did not diverge"
            )
    return state


__all__ = ["open_regular", "read_weights"]
