"""Published pretrained weights as a model's starting point: ``"tv:NAME@WEIGHTS"`` and ``"timm:NAME@pretrained"``.

The weights initialise the model, which is then trained on the data like any other (the base-model cache
tells the two starts apart by their initial weights). The classifier is re-initialised for the data's
classes and the input convolution adapted to its channels (the pretrained RGB filters summed for one
channel, repeated and rescaled for more), as timm does for its own models.

Nothing is downloaded: the weights are read from the local caches torchvision and timm fill when they
download (torch hub's ``checkpoints`` directory, the Hugging Face hub cache), so a machine without a network
uses the weights fetched once elsewhere; missing ones raise :class:`WeightsNotFoundError` naming the file.
A cached file is only ever read weights-only: anyone who can write to the cache could otherwise make the
loader run code (torchvision's own loader unpickles it fully). One that fails raises :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from prune_env.errors import CheckpointError, UnknownNameError, WeightsNotFoundError

WEIGHTS_SEPARATOR = "@"
TIMM_PRETRAINED = "pretrained"


def split_weights(spec: str) -> tuple[str, str | None]:
    """``"tv:resnet18@IMAGENET1K_V1"`` -> ``("tv:resnet18", "IMAGENET1K_V1")``; no ``@``: ``(spec, None)``."""
    name, sep, weights = spec.partition(WEIGHTS_SEPARATOR)
    if sep and not weights:
        raise UnknownNameError(f"model {spec!r} names no weights after '@'; e.g. 'tv:resnet18@DEFAULT'")
    return name, (weights if sep else None)


def _hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def torchvision_weights(name: str, weights: str) -> Any:
    """The torchvision weights enum member ``weights`` of model ``name``, its file checked to be cached."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    known = ["DEFAULT", *(w.name for w in enum)]
    if weights not in known:
        raise UnknownNameError(
            f"unknown weights {weights!r} for torchvision {name}; use 'tv:{name}@W' with W one of: {', '.join(known)}"
        )
    member = enum[weights]  # DEFAULT is an alias of the recommended member
    path = _hub_checkpoint(member.url)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the {member} weights are not in the local cache ({path}); download them once where there is a "
            f"network (torchvision.models.get_model({name!r}, weights={weights!r})) and copy the file there, "
            "or pass your own trained weights with --weights PATH"
        )
    return member


def _timm_checkpoint(name: str) -> Path:
    """The cached file of timm's default pretrained weights for ``name`` (hub cache or torch hub)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise UnknownNameError(f"timm has no pretrained weights for {name!r}; drop '@{TIMM_PRETRAINED}'")
    candidates: list[Path] = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
        candidates.append(Path(f"the Hugging Face hub cache: {cfg.hf_hub_id}/model.safetensors"))
    if isinstance(cfg.url, str) and cfg.url:
        path = _hub_checkpoint(cfg.url)
        if path.is_file():
            return path
        candidates.append(path)
    raise WeightsNotFoundError(
        f"timm's pretrained weights for {name!r} are not in the local cache ({'; '.join(map(str, candidates))}); "
        f"download them once where there is a network (timm.create_model({name!r}, pretrained=True)), or "
        "pass your own trained weights with --weights PATH"
    )


def check_pretrained(prefix: str, name: str, weights: str) -> None:
    """Refuse unknown or uncached weights before any work (prefix ``tv:`` or ``timm:``)."""
    if prefix == "tv:":
        torchvision_weights(name, weights)
    elif weights != TIMM_PRETRAINED:
        raise UnknownNameError(
            f"timm weights are chosen by the model name (e.g. 'timm:resnet18.a1_in1k'); write "
            f"'timm:{name}@{TIMM_PRETRAINED}', not '@{weights}'"
        )
    else:
        _timm_checkpoint(name)


def _classifier(model: nn.Module, classes: int) -> tuple[str, nn.Linear | nn.Conv2d]:
    heads = [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == classes)
    ]
    if not heads:
        raise UnknownNameError(f"{type(model).__name__}: no {classes}-class classifier layer to replace")
    return heads[-1]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def adapt_input_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters for ``in_channels`` inputs: summed for one, cycled and rescaled (by 3/in) for more."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


# Old torchvision DenseNet checkpoints name layers "norm.1", "conv.2", ...; torchvision renames them on load.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_AUXILIARY_HEADS = ("aux1.", "aux2.", "AuxLogits.")


def _redownload(name: str, weights: str) -> str:
    return (
        f"delete it and download it again where there is a network (torchvision.models.get_model({name!r}, "
        f"weights={weights!r})), or pass your own trained weights with --weights PATH"
    )


def _published_architecture(name: str, member: Any) -> nn.Module:
    """``name`` built as torchvision's builder builds it for ``member``'s checkpoint, but without weights.

    These are the constructor arguments the builders override when given weights: the checkpoint was
    saved from that architecture. The auxiliary heads are left out, as for the randomly initialised models.
    """
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "num_classes": len(member.meta["categories"])}
    if name.startswith(("googlenet", "inception")):
        # transform_input re-normalises three ImageNet channels; the data are normalised their own way.
        kwargs.update(aux_logits=False, init_weights=False, transform_input=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = member.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = member.meta["min_size"]
    return torchvision.models.get_model(name, **kwargs)


def _load_published(model: nn.Module, name: str, weights: str, path: Path) -> None:
    """Load the cached checkpoint ``path`` into ``model`` weights-only, never unpickling code."""
    from prune_env.trusted_files import read_weights

    redownload = _redownload(name, weights)
    try:
        state = read_weights(path.resolve())  # a link into a shared cache is fine; its target is checked
    except CheckpointError as exc:
        # read_weights ends its messages with advice for saved models; a cached download is fetched again.
        problem = str(exc).rpartition("; ")[0] or str(exc)
        raise CheckpointError(f"{problem}; it is torch hub's cached download: {redownload}") from None
    for key in list(state):  # in place: the state's _metadata (layer versions) must survive
        legacy = _DENSENET_LEGACY_KEY.match(key) if name.startswith("densenet") else None
        if legacy:
            state[legacy.group(1) + legacy.group(2)] = state.pop(key)
        elif name.startswith(("googlenet", "inception")) and key.startswith(_AUXILIARY_HEADS):
            del state[key]
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path} does not hold torchvision's {name} {weights} weights ({first}); {redownload}"
        ) from None


def torchvision_pretrained(name: str, weights: str, num_classes: int, in_channels: int) -> nn.Module:
    member = torchvision_weights(name, weights)
    model = _published_architecture(name, member)
    _load_published(model, name, weights, _hub_checkpoint(member.url))
    head_name, head = _classifier(model, len(member.meta["categories"]))
    if isinstance(head, nn.Linear):
        _set(model, head_name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    else:
        geometry = cast("tuple[int, int]", head.kernel_size), cast("tuple[int, int]", head.stride)
        _set(model, head_name, nn.Conv2d(head.in_channels, num_classes, *geometry))
    if in_channels != 3:
        from prune_env.models.torchvision_adapter import replace_stem

        original, new = replace_stem(model, in_channels)
        with torch.no_grad():
            new.weight.copy_(adapt_input_weight(original.weight, in_channels))
            if original.bias is not None and new.bias is not None:
                new.bias.copy_(original.bias)
    return model


def _file_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or hostile weights file raises (torch, timm and safetensors)."""
    from safetensors import SafetensorError  # a dependency of timm

    errors = (SafetensorError, RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError)
    return (pickle.UnpicklingError, *errors)


def timm_pretrained(name: str, num_classes: int, in_channels: int) -> nn.Module:
    from prune_env.models.timm_adapter import import_timm

    path = _timm_checkpoint(name)
    redownload = (
        f"delete it and download it again where there is a network (timm.create_model({name!r}, "
        "pretrained=True)), or pass your own trained weights with --weights PATH"
    )
    try:
        # A local file overrides timm's download source; timm resets the classifier and adapts the stem.
        # timm reads it weights-only (or as safetensors), so a hostile file is refused, not run.
        model = import_timm().create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            in_chans=in_channels,
            pretrained_cfg_overlay={"file": str(path), "source": "", "hf_hub_id": None},
        )
    except _file_errors() as exc:  # how a bad file fails in torch's, timm's or safetensors' reader
        # timm re-raises torch's weights-only refusal as a RuntimeError (caused by the UnpicklingError).
        if isinstance(exc, pickle.UnpicklingError) or isinstance(exc.__cause__, pickle.UnpicklingError):
            problem = (
                "is not a plain weights file: torch's weights-only reader refused it (it holds pickled objects "
                "other than tensors, or is not a weights file at all), and it will not be loaded, since "
                "unpickling it could run code"
            )
        else:
            first = " ".join(str(exc).split())[:160] or "no details"
            problem = f"is not a readable copy of timm's {name} weights ({type(exc).__name__}: {first})"
        raise CheckpointError(f"{path} {problem}; {redownload}") from None
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or infinite values; {redownload}")
    return model
