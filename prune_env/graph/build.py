"""Building a dependency graph: validate the inputs, trace, propagate (in eval mode, then in train mode for
layers only reached in training), resolve."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from prune_env.errors import InvalidSettingError, PruneEnvError, UntraceableModelError
from prune_env.graph.capture import CAPTURED_VALUE, BranchOnValuesError, capture
from prune_env.graph.dependency_graph import DependencyGraph, check_module
from prune_env.graph.elements import State
from prune_env.graph.layers import load_spec_providers
from prune_env.graph.ops import LIBRARY_LEAVES, register_library_ops
from prune_env.graph.propagate import Propagator, calls_black_box
from prune_env.graph.resolve import resolve
from prune_env.graph.tracing import trace
from prune_env.validation import close_names


def build_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> DependencyGraph:
    """Trace ``model`` and find its channel groups (how: :mod:`prune_env.graph`).

    ``example_inputs``: a tensor or a tuple of tensors the model accepts; a small spatial size keeps this
    fast, and costs are exact for that input size. ``leaf_modules``: module types or qualified names to
    treat as black boxes (for modules fx cannot trace); their channels are never pruned.
    The model is not modified: it is run once in eval mode — on shapes only, unless a black-box layer
    needs real values — and once more in train mode with BatchNorm statistics frozen if some layers are
    only reached in training, as Inception's auxiliary heads are.
    """
    check_module(model, "build_graph")
    inputs = example_tuple(example_inputs)
    # One walk over the module tree serves every use below (each walk costs about as much as a small
    # model's whole propagation).
    named = list(model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())  # the names torch.fx uses (a shared module: its first name)
    leaf_modules = _leaf_list(leaf_modules, modules)
    load_spec_providers(modules.values())
    register_library_ops()
    state = State()
    for registry in ("_parameters", "_buffers"):  # the order of named_parameters(), then named_buffers()
        for prefix, m in named:
            for attr, t in getattr(m, registry).items():
                if t is not None:
                    state.tensor_names.setdefault(id(t), f"{prefix}.{attr}" if prefix else attr)
    was_training = {m: m.training for m in modules.values()}
    try:
        model.eval()
        graph, tensors = _graph(model, inputs, leaf_modules)
        try:
            state = _run(model, modules, graph, state, tensors)
        except Exception as exc:
            _raise_if_model_rejects(model, inputs, exc)
            raise
        # A layer is reached when it is called, or when traced code fetches its tensors (a layer traced
        # through, such as a fused norm + activation, shows up only as reads of its parameters).
        reached = {str(n.target) for n in graph.nodes if n.op == "call_module"}
        reached.update(str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr")
        unreached = [
            name
            for name, m in modules.items()
            if name and any(p is not None for p in m._parameters.values()) and not _under(name, reached)
        ]
        if unreached:
            # Layers only reached in training mode (auxiliary heads): trace again in train mode with
            # normalisation layers kept in eval mode (no statistics update, batch size 1 works).
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
            state.record_costs = False
            try:
                graph_train, tensors = _graph(model, inputs, leaf_modules)
                state = _run(model, modules, graph_train, state, tensors)
            except Exception as exc:
                # The channels feeding training-only layers are unknown: the pruned model is then only
                # guaranteed in eval mode. Say so rather than fail: eval-mode pruning is still exact.
                warnings.warn(
                    f"prune_env: layers reached only in training mode ({', '.join(unreached[:4])}) could not "
                    f"be analysed with this example input ({type(exc).__name__}: {str(exc)[:120]}); the pruned "
                    "model is valid in eval mode only. Pass a larger example input to prune them too.",
                    stacklevel=2,
                )
    finally:
        for m, flag in was_training.items():
            m.__dict__["training"] = flag  # where Module.__setattr__ would put it, minus its checks
    return resolve(model, state)


def _graph(
    model: nn.Module, inputs: tuple[Any, ...], leaf_modules: Sequence[type[nn.Module] | str]
) -> tuple[torch.fx.Graph, tuple[torch.Tensor, ...]]:
    """The model's graph and the tensors its placeholders stand for: traced by torch.fx when it can, else
    captured from one run on the inputs (a detector's list of images, data-dependent post-processing)."""
    if all(isinstance(x, torch.Tensor) for x in inputs):
        try:
            return trace(model, leaf_modules, LIBRARY_LEAVES), inputs
        except UntraceableModelError as untraceable:
            reason: Exception = untraceable
    else:
        reason = InvalidSettingError("the inputs are not tensors only")
    try:
        graph, tensors = capture(model, inputs, leaf_modules, LIBRARY_LEAVES)
    except BranchOnValuesError as branch:
        if branch.module:
            where = f"module {branch.module!r} ({branch.module_type})"
            fix = (
                "Mark it as a leaf so it is treated as a black box (its channels then stay unpruned): "
                f"build_graph(model, example_inputs, leaf_modules=[{branch.module_type}]) or "
                f"leaf_modules=[{branch.module!r}]."
            )
        else:
            where = f"the model's forward ({branch.module_type})"
            fix = "Move the branch into a submodule (then declared a leaf) or out of the model's forward."
        raise UntraceableModelError(
            f"{where} branches on tensor values ({branch.read}) before running {branch.layer!r}, so neither "
            f"tracing nor a captured run holds for every input (torch.fx: "
            f"{str(reason).splitlines()[0][:300]}). {fix}"
        ) from None
    except Exception as exc:
        _raise_if_model_rejects(model, inputs, exc)
        raise UntraceableModelError(
            f"{type(model).__name__} can be neither traced ({reason}) nor captured from a run on the example "
            f"input ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    return graph, tuple(tensors)


def example_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """The example inputs as a non-empty tuple of tensors, or :class:`InvalidSettingError` saying why not."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InvalidSettingError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}; pass an input batch the model accepts, e.g. "
            "torch.randn(1, 3, 32, 32)"
            + (
                " (torch.from_numpy(x).float() converts an array)"
                if isinstance(example_inputs, np.ndarray)
                else ""
            )
        )
    for i, x in enumerate(example_inputs):
        leaves = pytree.tree_leaves(x)
        bad = next((leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)), None)
        if not leaves or bad is not None:
            raise InvalidSettingError(
                f"example_inputs[{i}] must be a tensor or a list of tensors (a detector's images), got "
                f"{type(x).__name__}"
                + (f" holding a {type(bad).__name__}" if bad is not None else "")
                + "; pass only tensors (torch.as_tensor(x) converts numbers and arrays)"
            )
    return tuple(example_inputs)


def _leaf_list(leaf_modules: Any, modules: Mapping[str, nn.Module]) -> tuple[type[nn.Module] | str, ...]:
    """The leaf types and names, each checked; a name must be one of ``modules``' (the tracer matches names
    exactly, so a misspelt one would silently leave its module traced)."""
    if isinstance(leaf_modules, (str, type)):
        raise InvalidSettingError(
            f"leaf_modules must be a list of module types or qualified names, got the single "
            f"{leaf_modules!r}; wrap it in a list: leaf_modules=[{leaf_modules!r}]"
        )
    leaves = tuple(leaf_modules)
    for leaf in leaves:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise InvalidSettingError(
                f"leaf_modules entries must be nn.Module subclasses or qualified module names, got "
                f"{leaf!r}; pass e.g. leaf_modules=[MyBlock] or leaf_modules=['features.3']"
            )
        if isinstance(leaf, str) and (not leaf or leaf not in modules):
            near = close_names(leaf, (name for name in modules if name))
            raise InvalidSettingError(
                f"leaf_modules name {leaf!r} matches no module of {type(modules['']).__name__}; "
                + (f"did you mean {', '.join(map(repr, near))}? " if near else "")
                + "name submodules as model.named_modules() does, e.g. 'features.3'"
            )
    return leaves


def _raise_if_model_rejects(model: nn.Module, inputs: tuple[Any, ...], exc: Exception) -> None:
    """Tell a bad example input apart from an engine failure: if the model itself cannot run on the
    input, that is what the caller must fix (this only runs after the analysis has failed)."""
    if isinstance(exc, PruneEnvError):
        return
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as direct:
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in pytree.tree_leaves(inputs))
        raise InvalidSettingError(
            f"the model cannot run on the example input ({shapes}): {type(direct).__name__}: "
            f"{str(direct)[:200]}; pass an input of the shape and dtype the model accepts, e.g. "
            "torch.randn(1, 3, 32, 32) for an RGB image classifier"
        ) from exc


def _under(name: str, reached: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:k]) in reached for k in range(1, len(parts) + 1))


def _run(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    graph: torch.fx.Graph,
    state: State,
    inputs: tuple[torch.Tensor, ...],
) -> State:
    """Propagate ids through ``graph``: on meta tensors (shapes only, fast) unless the model has a black-box
    layer or some op fails on them (no meta kernel, or it reads data: ``.item()``), else on real tensors; a
    captured graph replays the values of its recorded run (real, and already computed).

    Returns the updated state; ``state`` itself is left as it was if the pass fails.
    """
    captured = any(CAPTURED_VALUE in n.meta for n in graph.nodes)
    if not captured and not calls_black_box(graph, modules):
        work = state.copy()
        try:
            with torch.no_grad():
                Propagator(model, graph, work, meta=True).run(*inputs)
            return work
        except Exception:
            pass  # redo this pass with real tensors
    work = state.copy()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        Propagator(model, graph, work, meta=False).run(*inputs)
    return work
