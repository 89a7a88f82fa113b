"""Published pretrained weights as a model's starting point: ``"tv:NAME@WEIGHTS"`` and ``"timm:NAME@pretrained"``.

The weights initialise the model, which is then trained on the data like any other (the base-model cache
tells the two starts apart by their initial weights). The classifier is re-initialised for the data's
classes and the input convolution adapted to its channels (the pretrained RGB filters summed for one
channel, repeated and rescaled for more), as timm does for its own models.

Nothing is downloaded: the weights are read from the local caches torchvision and timm fill when they
download (torch hub's ``checkpoints`` directory, the Hugging Face hub cache), so a machine without a network
uses the weights fetched once elsewhere; missing ones raise :class:`WeightsNotFoundError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from prune_env.errors import UnknownNameError, WeightsNotFoundError

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


def torchvision_pretrained(name: str, weights: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    member = torchvision_weights(name, weights)
    kwargs: dict[str, Any] = {"weights": member}
    if name.startswith(("googlenet", "inception")):
        kwargs["aux_logits"] = False  # one output, as for the randomly initialised models
    model = torchvision.models.get_model(name, **kwargs)  # reads the cached file: checked above
    if hasattr(model, "transform_input"):
        model.transform_input = False  # re-normalises three ImageNet channels; the data are its own
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


def timm_pretrained(name: str, num_classes: int, in_channels: int) -> nn.Module:
    from prune_env.models.timm_adapter import import_timm

    path = _timm_checkpoint(name)
    # A local file overrides timm's download source; timm resets the classifier and adapts the stem.
    return import_timm().create_model(
        name,
        pretrained=True,
        num_classes=num_classes,
        in_chans=in_channels,
        pretrained_cfg_overlay={"file": str(path), "source": "", "hf_hub_id": None},
    )
