"""Channel importance: one score per unit of a group, aggregated over every coupled layer.

A group's units are scored together because they are removed together: a residual channel's importance
is the sum over every convolution that writes or reads it, not the score of one layer (DepGraph's point).
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from prune_env.batches import model_output
from prune_env.errors import DatasetError, InvalidSettingError, UnknownNameError
from prune_env.graph import ChannelGroup, Member

Importance = Callable[[ChannelGroup, nn.Module], np.ndarray]
"""A callable ``(group, model) -> scores`` with one score per unit; lower scores are pruned first."""

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""A batch source: called with no arguments, it yields ``(inputs, labels)`` training batches (the same ones
every call). Data-driven criteria read a few of them; a user's importance callable with a ``batches``
parameter receives one."""

DATA_DRIVEN = ("taylor", "hrank")  # the named criteria that read training batches

_NORM_TYPES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm"}


def member_tensor(model: nn.Module, member: Member) -> tuple[torch.Tensor, int] | None:
    """The weight tensor a member's channels index, and the axis they run along (None if weightless).

    Raises :class:`InvalidSettingError` when ``model`` has no such layer or the tensor's extent along the
    axis is not the member's: the group comes from a graph built on another model, whose positions would
    index the wrong weights (or out of range)."""
    found = _member_tensor(model, member)
    if found is not None and found[0].shape[found[1]] != member.size:
        raise InvalidSettingError(
            f"group member {member.layer!r} ({member.kind}) has {member.size} indices along dim "
            f"{found[1]} in the graph but {found[0].shape[found[1]]} in this model: the graph was built from "
            "a different model; build the graph from this model: build_graph(model, x)"
        )
    return found


def _member_tensor(model: nn.Module, member: Member) -> tuple[torch.Tensor, int] | None:
    try:
        if member.kind == "param":
            if _is_buffer(model, member.layer):
                return None  # running statistics (a traced norm-act layer's), not weights: not scored
            return layer_tensor(model, member.layer).detach(), member.dim
        module = model.get_submodule(member.layer)
    except AttributeError:
        raise InvalidSettingError(
            f"this model has no {member.layer!r} ({member.layer_type}), which the graph's group names: the "
            "graph was built from a different model; build the graph from this model: build_graph(model, x)"
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if member.kind == "in" and getattr(module, "groups", 1) > 1:
        return None  # grouped: a group's inputs and outputs are one unit, scored by the outputs
    # The axis the graph recorded: 0 for outputs and 1 for inputs, but the reverse for a transposed conv.
    return weight.detach(), member.dim


def _is_buffer(model: nn.Module, qualified_name: str) -> bool:
    owner_name, _, attr = qualified_name.rpartition(".")
    return attr in model.get_submodule(owner_name)._buffers


def layer_tensor(model: nn.Module, qualified_name: str) -> torch.Tensor:
    """The tensor a raw-parameter member names: a parameter, a buffer or a plain tensor attribute (traced
    code may fetch any of them). AttributeError if there is none."""
    owner_name, _, attr = qualified_name.rpartition(".")
    tensor = getattr(model.get_submodule(owner_name), attr)
    if not isinstance(tensor, torch.Tensor):
        raise AttributeError(f"{qualified_name!r} is not a tensor")
    return tensor


def _per_position(weight: torch.Tensor, axis: int, power: int) -> np.ndarray:
    other = [d for d in range(weight.ndim) if d != axis]
    w = weight.float()
    magnitude = w.abs() if power == 1 else w * w
    return (magnitude.sum(dim=other) if other else magnitude).cpu().numpy().astype(np.float64)


def _per_unit(group: ChannelGroup, member: Member, per_position: np.ndarray) -> np.ndarray:
    """A member's per-position values summed over each unit's positions: one value per unit."""
    positions = np.asarray(member.positions).reshape(group.units, member.multiplicity)
    return per_position[positions].sum(axis=1)


def _norm_scores(
    group: ChannelGroup,
    model: nn.Module,
    power: int,
    norms_only: bool,
    cache: dict[tuple[str, str, int], np.ndarray] | None = None,
) -> np.ndarray:
    scores = np.zeros(group.units, dtype=np.float64)
    for member in group.members:
        if norms_only and member.layer_type not in _NORM_TYPES:
            continue
        key = (member.layer, member.kind, power)
        per_pos = cache.get(key) if cache is not None else None
        if per_pos is None:
            found = member_tensor(model, member)
            if found is None:
                continue
            per_pos = _per_position(*found, power)
            if cache is not None:
                cache[key] = per_pos
        scores += _per_unit(group, member, per_pos)
    return scores


class MagnitudeImportance:
    """Sum of |w| (``power=1``) or w² (``power=2``) over every coupled slice of a unit: conv filters and
    input columns, linear rows and columns, normalisation scales. ``norms_only`` scores by BN/LN/GN scales
    alone (Network Slimming); groups without a normalisation layer then fall back to all weights.

    Per-layer scores are cached for the lifetime of the object, so a layer shared by many groups (a
    DenseNet concat consumer) is scored once: create a fresh object for a changed model.
    """

    def __init__(self, power: int = 1, norms_only: bool = False) -> None:
        self.power = power
        self.norms_only = norms_only
        self._cache: dict[tuple[str, str, int], np.ndarray] = {}

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        norms_only = self.norms_only and any(m.layer_type in _NORM_TYPES for m in group.members)
        return _norm_scores(group, model, self.power, norms_only, self._cache)


def l1_importance(group: ChannelGroup, model: nn.Module) -> np.ndarray:
    """Sum of absolute weights of every coupled slice (conv filters and input columns, BN scales, ...)."""
    return _norm_scores(group, model, power=1, norms_only=False)


def l2_importance(group: ChannelGroup, model: nn.Module) -> np.ndarray:
    """Sum of squared weights of every coupled slice."""
    return _norm_scores(group, model, power=2, norms_only=False)


def bn_scale_importance(group: ChannelGroup, model: nn.Module) -> np.ndarray:
    """|γ| of the normalisation layers in the group (Network Slimming); groups without one fall back to L1."""
    return MagnitudeImportance(power=1, norms_only=True)(group, model)


class RandomImportance:
    """Uniformly random scores from a seeded generator (a baseline)."""

    def __init__(self, seed: int | np.random.Generator | None = None) -> None:
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        return self.rng.random(group.units)


class FPGMImportance:
    """Filter Pruning via Geometric Median (He et al., 2019): a producer's filter close to the geometric
    median of its layer's filters is the one the others can best replace. A unit's score is the sum of
    Euclidean distances from its filter to every other filter of the same layer, summed over the group's
    producers (conv and linear output rows); the most central units go first."""

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        scores = np.zeros(group.units, dtype=np.float64)
        for member in group.producers:
            found = member_tensor(model, member)
            if found is None:
                continue
            weight, axis = found
            rows = weight.movedim(axis, 0).reshape(weight.shape[axis], -1).double()
            per_pos = torch.cdist(rows, rows).sum(dim=1).cpu().numpy()
            scores += _per_unit(group, member, per_pos)
        return scores


def _first_batches(batches: Batches, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    produced = batches()
    try:
        iterator = iter(produced)
    except TypeError:
        raise InvalidSettingError(
            f"the batch source returned a {type(produced).__name__}; it must return an iterable of (inputs, "
            "labels) batches (a DataLoader, a list or a generator)"
        ) from None
    taken = list(itertools.islice(iterator, count))
    if not taken:
        raise InvalidSettingError("the batch source yielded no batch; give it at least one (inputs, labels)")
    return [_checked_batch(index, item) for index, item in enumerate(taken)]


def _checked_batch(index: int, item: object) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(inputs, labels)`` batch of a source, refused unless it is one: floating-point inputs without
    NaN or inf and one integer label per input (what the model makes of them is checked as it runs)."""
    where = f"batch {index} of the batch source"
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise InvalidSettingError(
            f"{where} is {kind}; the source must yield (inputs, labels) pairs of tensors"
        )
    x, y = item
    for what, value in (("inputs", x), ("labels", y)):
        if not isinstance(value, torch.Tensor):
            raise InvalidSettingError(
                f"{where} has {what} of type {type(value).__name__}; the source must yield (inputs, labels) "
                "pairs of tensors"
            )
    if not x.is_floating_point() or x.ndim < 2:
        raise DatasetError(
            f"{where} has {x.dtype} inputs of shape {tuple(x.shape)}; give a floating-point batch, one sample "
            "per row (N, C, H, W)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(
            f"{where} has {len(x)} inputs but labels of shape {tuple(y.shape)}; give one class index per input"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DatasetError(f"{where} has {y.dtype} labels; give integer class indices (labels.long())")
    if not bool(torch.isfinite(x).all()):
        raise DatasetError(f"{where} has NaN or inf in its inputs; clean the data the source reads")
    return x, y


def _batch_output(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    """The model's output on batch ``index``, with inputs the model cannot take named as the batch's fault."""

    def mismatch(problem: str) -> DatasetError:
        return DatasetError(
            f"{problem} from batch {index} of the batch source (inputs of shape {tuple(x.shape)}); give batches "
            "of the inputs the model was built for"
        )

    return model_output(model, x, mismatch)


class _FromData:
    """An importance measured on a copy of the model (eval mode) over its first ``max_batches`` training
    batches, once per model object."""

    def __init__(self, batches: Batches, max_batches: int) -> None:
        self.batches = batches
        self.max_batches = max_batches
        self._model_id: int | None = None

    def _fit(self, model: nn.Module) -> None:
        if self._model_id == id(model):
            return
        twin = copy.deepcopy(model).eval()
        device = next((p.device for p in twin.parameters()), torch.device("cpu"))
        batches = [(x.to(device), y.to(device)) for x, y in _first_batches(self.batches, self.max_batches)]
        self._measure(twin, batches)
        self._model_id = id(model)

    def _measure(self, twin: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        raise NotImplementedError


class TaylorImportance(_FromData):
    """First-order Taylor importance (Molchanov et al., 2019): the loss change from removing a unit,
    estimated as ``(Σ w·∂L/∂w)²`` over every weight the unit's channels index (filters, input columns, norm
    scales), with gradients of the cross-entropy accumulated over ``max_batches`` training batches."""

    def __init__(self, batches: Batches, max_batches: int = 4) -> None:
        super().__init__(batches, max_batches)
        self._products: dict[str, torch.Tensor] = {}

    def _measure(self, twin: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        twin.zero_grad(set_to_none=True)
        for index, (x, y) in enumerate(batches):
            logits = _batch_output(twin, x, index)
            if y.numel() and not (int(y.min()) >= 0 and int(y.max()) < logits.shape[-1]):
                raise DatasetError(
                    f"batch {index} of the batch source has labels {int(y.min())}..{int(y.max())}, but the model "
                    f"has {logits.shape[-1]} outputs; labels are class indices 0..{logits.shape[-1] - 1}"
                )
            nn.functional.cross_entropy(logits, y).backward()
        self._products = {
            name: (p.detach() * p.grad).double() for name, p in twin.named_parameters() if p.grad is not None
        }

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        self._fit(model)
        sums = np.zeros(group.units, dtype=np.float64)
        for member in group.members:
            found = member_tensor(model, member)
            if found is None:
                continue
            axis = found[1]
            name = member.layer if member.kind == "param" else f"{member.layer}.weight"
            product = self._products.get(name)
            if product is None:
                continue
            other = [d for d in range(product.ndim) if d != axis]
            per_pos = (product.sum(dim=other) if other else product).cpu().numpy()
            sums += _per_unit(group, member, per_pos)
        return sums**2


class HRankImportance(_FromData):
    """HRank (Lin et al., 2020): a channel whose feature maps have low rank carries little information.
    A unit's score is the average matrix rank of its producers' output maps (conv outputs, one ``H × W``
    map per sample) over ``max_batches`` training batches; units without a spatial map score by nothing
    else here, so groups of linear producers rank their units equally."""

    def __init__(self, batches: Batches, max_batches: int = 2) -> None:
        super().__init__(batches, max_batches)
        self._ranks: dict[str, np.ndarray] = {}

    def _measure(self, twin: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, _args: object, out: object) -> None:
                if isinstance(out, torch.Tensor) and out.ndim == 4:
                    ranks = torch.linalg.matrix_rank(out.detach().double()).sum(dim=0)
                    sums[name] = sums[name] + ranks if name in sums else ranks
                    counts[name] = counts.get(name, 0) + out.shape[0]

            return record

        convs = [(n, m) for n, m in twin.named_modules() if isinstance(m, nn.Conv2d)]
        handles = [m.register_forward_hook(hook(n)) for n, m in convs]
        try:
            with torch.no_grad():
                for index, (x, _) in enumerate(batches):
                    _batch_output(twin, x, index)
        finally:
            for h in handles:
                h.remove()
        self._ranks = {n: (sums[n].double() / counts[n]).cpu().numpy() for n in sums}

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        self._fit(model)
        scores = np.zeros(group.units, dtype=np.float64)
        for member in group.producers:
            ranks = self._ranks.get(member.layer)
            if ranks is None or len(ranks) != member.size:
                continue
            scores += _per_unit(group, member, ranks)
        return scores


IMPORTANCE: dict[str, Callable[[], Importance]] = {
    "l1": lambda: MagnitudeImportance(power=1),
    "l2": lambda: MagnitudeImportance(power=2),
    "bn_scale": lambda: MagnitudeImportance(power=1, norms_only=True),
    "random": RandomImportance,
    "fpgm": FPGMImportance,
}


def get_importance(
    importance: str | Importance,
    seed: int | np.random.Generator | None = None,
    batches: Batches | None = None,
) -> Importance:
    """Resolve a name or pass a callable through.

    Names: "l1", "l2", "bn_scale", "fpgm", "random" (seeded by ``seed``), and the data-driven "taylor" and
    "hrank", which need ``batches`` (a :data:`Batches` source of training data). A callable with a
    ``batches`` parameter is given the source as a keyword argument.
    """
    if batches is not None and not callable(batches):
        raise InvalidSettingError(
            f"batches must be a callable returning (inputs, labels) batches, got {type(batches).__name__} "
            "(for a DataLoader: batches=lambda: loader)"
        )
    if callable(importance):
        if _asks_for_batches(importance):
            if batches is None:
                raise InvalidSettingError(
                    "the importance callable asks for batches, but no batch source was given: pass batches= "
                    "(a PruningProblem passes its training batches)"
                )
            source = batches
            return lambda group, model: importance(group, model, batches=source)  # type: ignore[call-arg]
        return importance
    if not isinstance(importance, str):
        raise InvalidSettingError(
            f"importance must be a name ({', '.join(importance_names())}) or a callable (group, model) -> "
            f"scores, got {type(importance).__name__}"
        )
    if importance == "random":
        return RandomImportance(seed)
    if importance in DATA_DRIVEN:
        if batches is None:
            raise InvalidSettingError(
                f"importance {importance!r} is computed from training data: pass batches= (a callable "
                "yielding (inputs, labels) batches); a PruningProblem passes its training batches"
            )
        return TaylorImportance(batches) if importance == "taylor" else HRankImportance(batches)
    if importance not in IMPORTANCE:
        raise UnknownNameError(
            f"unknown importance {importance!r}; choose one of {importance_names()} or a callable"
        )
    return IMPORTANCE[importance]()


def importance_names() -> list[str]:
    return sorted([*IMPORTANCE, *DATA_DRIVEN])


def _asks_for_batches(fn: Callable[..., object]) -> bool:
    try:
        return "batches" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
