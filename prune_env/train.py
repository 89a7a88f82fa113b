"""Training the unpruned base model (cached on disk) and the final knowledge-distillation fine-tune.

``train_base`` caches its result under ``$PRUNE_ENV_CACHE`` (default ``~/.cache/prune_env``) in a file
named by a hash of everything that determines the weights: the architecture, its initial weights, the
dataset and its split seed, and every hyper-parameter. Files are written atomically and carry a checksum;
a file that is truncated, corrupt, or for another key is ignored with a warning and the model retrained.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from prune_env.batches import iterate_batches
from prune_env.cache import cache_dir, cache_key, dataset_fingerprint, load_entry, save_entry, state_digest
from prune_env.data import DataSource, Splits, as_splits
from prune_env.device import resolve_device
from prune_env.errors import InvalidSettingError
from prune_env.models import ModelSpec, get_model, model_name
from prune_env.settings import replace_checked
from prune_env.validation import as_int, as_real

CACHE_FORMAT = 1
# Inference batch size. benchmarks/eval_speed.py on 2 CPU cores: 128 was fastest or within noise of the
# fastest for resnet20/56, full and pruned, at 8x8 and 32x32; 512 was slower at 32x32 (cache pressure)
# and 32 at 8x8 (per-call overhead).
EVAL_BATCH_SIZE = 128


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of ``train_base``: SGD with Nesterov momentum, one warm-up epoch, cosine decay."""

    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.0


# Measured with one thread on a shared 2-core CPU: digits + resnet20 reaches
# 98.9% test accuracy in ~10 s, Fashion-MNIST + resnet20 93.0% in 10 epochs (73 min under load).
RECIPES: dict[str, TrainConfig] = {
    "digits": TrainConfig(epochs=20, lr=0.1, batch_size=64),
    "fashion-mnist": TrainConfig(epochs=10, lr=0.1, batch_size=128),
    "cifar10": TrainConfig(epochs=160, lr=0.1, batch_size=128),
    "cifar100": TrainConfig(epochs=160, lr=0.1, batch_size=128),
    "fake": TrainConfig(epochs=2, lr=0.05, batch_size=64),
}


# ------------------------------------------------------------------------------------------------ evaluation


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset`` (eval mode, no gradients)."""
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in iterate_batches(dataset, batch_size):
        x, y = x.to(dev), y.to(dev)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "samples": float(n)}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss: ``alpha * T² * KL(teacher/T || student/T) + (1 - alpha) * CE``.

    The T² factor keeps the soft term's gradient scale independent of the temperature. ``targets=None``
    (or ``alpha=1``) is pure distillation.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    if targets is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from ``teacher``: ``alpha * T² * KL(teacher/T || student/T) + (1 - alpha) * CE``."""

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.9


def _fit(
    model: nn.Module,
    train: Dataset[Any],
    recipe: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    distill: Distillation | None = None,
    warmup_epochs: int = 1,
    progress: bool = True,
    desc: str = "train",
) -> float:
    """Train ``model`` in place; returns the mean loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    epochs, batch_size = recipe.epochs, recipe.batch_size
    n = len(train)  # type: ignore[arg-type]
    # Drop a ragged last batch only when it would be tiny: a batch of 1-2 makes BatchNorm statistics noisy.
    drop_last = n % batch_size < max(2, batch_size // 4) and n > batch_size
    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        # No weight decay on BatchNorm affine parameters and biases (standard practice; it helps accuracy).
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total, min(total // 2, warmup_epochs * steps_per_epoch))
    )
    if distill is not None:
        distill.teacher.eval()
    model.train()
    last_epoch_loss = float("nan")
    with tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step") as bar:
        for epoch in range(epochs):
            loss_sum, count = 0.0, 0
            for x, y in iterate_batches(
                train, batch_size, shuffle=True, generator=generator, drop_last=drop_last
            ):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                if distill is None:
                    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                else:
                    with torch.no_grad():
                        teacher_logits = distill.teacher(x)
                    loss = kd_loss(logits, teacher_logits, y, distill.temperature, distill.alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(y)
                count += len(y)
                bar.update(1)
            last_epoch_loss = loss_sum / max(count, 1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{last_epoch_loss:.3f}")
    model.eval()
    return last_epoch_loss


# ------------------------------------------------------------------------------------------------ cache


def _cache_key(model: nn.Module, arch: str, splits: Splits, seed: int, config: TrainConfig) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "arch": arch,
        "structure": repr(model),  # catches a changed architecture behind an unchanged name
        "init_state": state_digest(model.state_dict()),
        "data": dataset_fingerprint(splits),
        "seed": seed,
        "config": asdict(config),
    }
    return cache_key(payload)


def checkpoint_path(
    model: ModelSpec,
    dataset: DataSource,
    seed: int = 0,
    *,
    cache: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> Path:
    """Where ``train_base`` with the same arguments stores (or would store) its checkpoint."""
    splits = as_splits(dataset, seed)
    net, arch = _initial_model(model, splits, seed)
    config = _config_for(splits, None, overrides)
    return _path_for(cache, arch, splits, _cache_key(net, arch, splits, seed, config))


def _path_for(cache: str | os.PathLike[str] | None, arch: str, splits: Splits, key: str) -> Path:
    # Readable tags for people browsing the cache; the key alone makes the name unique.
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model_name(arch)}-{splits.name.split(':')[0]}").strip("-")
    return cache_dir(cache) / "base" / f"{tag[:60]}-{key[:20]}.pt"


def _initial_model(model: ModelSpec, splits: Splits, seed: int) -> tuple[nn.Module, str]:
    """A model to train (never the caller's object) and its architecture tag for the cache key."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model), f"module:{type(model).__module__}.{type(model).__qualname__}"
    # Initialise under the seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_model(model, splits.num_classes, splits.in_channels)
    arch = model if isinstance(model, str) else f"factory:{getattr(model, '__qualname__', repr(model))}"
    return net, arch


# Options of train_base beyond TrainConfig's fields that PruningProblem's ``train_kwargs`` may set.
_TRAIN_BASE_OPTIONS = ("cache", "use_cache")


def check_train_options(options: Mapping[str, Any]) -> None:
    """Refuse unknown keys and out-of-range values of ``train_base`` options before any training."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(options) - known - set(_TRAIN_BASE_OPTIONS)
    if unknown:
        raise InvalidSettingError(
            f"unknown training options {sorted(unknown)}; valid: {sorted(known | set(_TRAIN_BASE_OPTIONS))}"
        )
    for name in ("epochs", "batch_size"):
        value = options.get(name)
        if value is not None and as_int(name, value) < (0 if name == "epochs" else 1):
            raise InvalidSettingError(f"{name} must be >= {0 if name == 'epochs' else 1}, got {value!r}")
    for name in ("lr", "weight_decay", "momentum", "label_smoothing"):
        value = options.get(name)
        if value is not None and as_real(name, value) < 0:
            raise InvalidSettingError(f"{name} must be >= 0, got {value!r}")


def _config_for(splits: Splits, config: TrainConfig | None, overrides: Mapping[str, Any]) -> TrainConfig:
    check_train_options(overrides)
    base = config if config is not None else RECIPES.get(splits.name, TrainConfig())
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------------ public


def train_base(
    model: ModelSpec,
    dataset: DataSource,
    seed: int = 0,
    *,
    config: TrainConfig | None = None,
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, float]]:
    """Train (or load from the cache) the unpruned model; returns ``(model, metrics)``.

    ``model`` is a name for :func:`prune_env.models.get_model` (initialised from ``seed``), a zero-arg
    factory, or an ``nn.Module`` (copied, never modified: the returned model is a trained copy).
    ``dataset`` is a :class:`Splits` or a name for :func:`prune_env.data.load` (split with ``seed``).
    The recipe is ``config`` (default ``RECIPES[dataset name]``) with ``overrides`` of its fields
    (``epochs=5``; ``None`` keeps the recipe's value; unknown names are refused). ``metrics`` holds ``test_accuracy``,
    ``val_accuracy``, ``val_loss``, ``train_loss``, ``train_seconds`` and ``cached`` (1.0 on a cache hit).
    The returned model is on ``device`` in eval mode.
    """
    splits = as_splits(dataset, seed)
    dev = resolve_device(device)
    net, arch = _initial_model(model, splits, seed)
    config = _config_for(splits, config, overrides)
    key = _cache_key(net, arch, splits, seed, config)
    path = _path_for(cache, arch, splits, key)
    cached = _load_cached(net, path, key) if use_cache else None
    if cached is not None:
        return net.to(dev).eval(), {**cached, "cached": 1.0}

    net.to(dev)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout and any other in-model randomness
        train_loss = _fit(
            net,
            splits.train,
            config,
            seed=seed,
            device=dev,
            progress=progress,
            desc=f"train {model_name(arch)} on {splits.name}",
        )
    seconds = time.perf_counter() - start
    val = evaluate(net, splits.val, device=dev)
    test = evaluate(net, splits.test, device=dev)
    metrics = {
        "train_loss": train_loss,
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_seconds": seconds,
        "epochs": float(config.epochs),
    }
    if use_cache:
        meta = {
            "arch": arch,
            "dataset": splits.name,
            "seed": seed,
            **asdict(config),
            "torch": str(torch.__version__),
        }
        save_entry(
            path,
            key,
            CACHE_FORMAT,
            {k: v.detach().cpu() for k, v in net.state_dict().items()},
            metrics=metrics,
            meta={k: v for k, v in meta.items() if isinstance(v, (str, int, float))},
        )
    return net.eval(), {**metrics, "cached": 0.0}


def _load_cached(net: nn.Module, path: Path, key: str) -> dict[str, float] | None:
    """Load the cached weights at ``path`` into ``net``; their metrics, or None when there are none that fit
    (a file that verifies but does not fit the model is treated like a corrupt one: retrained, with a warning)."""
    ckpt = load_entry(path, key, CACHE_FORMAT)
    if ckpt is None:
        return None
    try:
        net.load_state_dict(ckpt["state_dict"])
    except Exception as exc:
        warnings.warn(f"cached checkpoint {path} does not fit the model ({exc}); retraining", stacklevel=3)
        return None
    return dict(ckpt["metrics"])


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune`: SGD from the pruned weights, no warm-up, cosine decay,
    distillation from the unpruned model. ``batch_size=None`` uses the dataset's training recipe's."""

    lr: float = 0.01
    batch_size: int | None = None
    weight_decay: float = 5e-4
    momentum: float = 0.9
    temperature: float = 4.0
    alpha: float = 0.9


def finetune(
    pruned: nn.Module,
    teacher: nn.Module | None,
    splits: Splits,
    epochs: int,
    *,
    config: FinetuneConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, float]]:
    """The final fine-tune of a pruned model, distilling from ``teacher`` (the unpruned model).

    ``config`` (default :class:`FinetuneConfig`) with ``overrides`` of its fields; ``teacher=None``
    fine-tunes with cross-entropy alone. Returns a fine-tuned copy (``pruned`` is not modified) and
    metrics with ``val_accuracy`` and ``test_accuracy``: this final report is the only place ``test`` is
    evaluated.
    """
    c = replace_checked(config or FinetuneConfig(), overrides, "finetune")
    dev = resolve_device(device)
    student = copy.deepcopy(pruned).to(dev)
    distill = None
    if teacher is not None:
        distill = Distillation(copy.deepcopy(teacher).to(dev).eval(), c.temperature, c.alpha)
    recipe = TrainConfig(
        epochs=epochs,
        lr=c.lr,
        batch_size=c.batch_size or RECIPES.get(splits.name, TrainConfig()).batch_size,
        weight_decay=c.weight_decay,
        momentum=c.momentum,
    )
    start = time.perf_counter()
    train_loss = float("nan")
    if epochs > 0:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            train_loss = _fit(
                student,
                splits.train,
                recipe,
                seed=seed,
                device=dev,
                distill=distill,
                warmup_epochs=0,
                progress=progress,
                desc="finetune",
            )
    seconds = time.perf_counter() - start
    val = evaluate(student, splits.val, device=dev)
    test = evaluate(student, splits.test, device=dev)
    return student.eval(), {
        "train_loss": train_loss,
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "finetune_seconds": seconds,
    }
