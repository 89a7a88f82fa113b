"""Batches of a dataset as tensors, and a model's output with a shape mismatch named by layer.

In-memory tensors (the small datasets, decoded once) are sliced directly: a DataLoader's per-sample calls
would dominate a CPU epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


def _layer_mismatch(name: str, layer: torch.nn.Module, shape: torch.Size) -> str | None:
    if isinstance(layer, torch.nn.modules.conv._ConvNd) and len(shape) >= 2 and shape[1] != layer.in_channels:
        return f"the model's layer {name!r} takes {layer.in_channels} input channels but receives {shape[1]}"
    if isinstance(layer, torch.nn.Linear) and len(shape) >= 1 and shape[-1] != layer.in_features:
        return f"the model's layer {name!r} takes {layer.in_features} input features but receives {shape[-1]}"
    return None


def model_output(
    model: torch.nn.Module, x: torch.Tensor, on_mismatch: Callable[[str], Exception]
) -> torch.Tensor:
    """``model(x)``. When a convolution or linear layer cannot take what reaches it, the exception
    ``on_mismatch`` makes of a sentence naming the layer, what it takes and what it receives is raised instead
    of torch's shape error (which stays attached as the cause); any other failure propagates as it is."""
    entered: list[tuple[str, torch.nn.Module, torch.Size]] = []

    def recorder(name: str) -> Callable[..., None]:
        def record(layer: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                entered.append((name, layer, args[0].shape))

        return record

    handles = [
        layer.register_forward_pre_hook(recorder(name))
        for name, layer in model.named_modules()
        if isinstance(layer, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
    ]
    try:
        return model(x)
    except RuntimeError as exc:
        problem = _layer_mismatch(*entered[-1]) if entered else None
        if problem is None:
            raise
        raise on_mismatch(problem) from exc
    finally:
        for handle in handles:
            handle.remove()


def in_memory_tensors(dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) when ``dataset`` is an in-memory TensorDataset (or a Subset of one), else None."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = in_memory_tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(dataset.indices, dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


def iterate_batches(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches; in-memory tensors are sliced directly (much faster than a DataLoader)."""
    tensors = in_memory_tensors(dataset)
    if tensors is None:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
        )
        yield from loader
        return
    x, y = tensors
    n = len(y)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    end = n - n % batch_size if drop_last else n
    for start in range(0, end, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def take(dataset: Dataset[Any], indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples at ``indices`` stacked into (inputs, labels) tensors."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    tensors = in_memory_tensors(dataset)
    if tensors is not None:
        return tensors[0][idx], tensors[1][idx]
    xs, ys = zip(*(dataset[int(i)] for i in idx), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
