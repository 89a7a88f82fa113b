"""The commands that work on a model: ``eval`` (score a saved pruned model), ``export`` (write it as ONNX
and/or TorchScript) and ``demo`` (prune a torchvision model and print its groups). Imported by the command
line only when one of them runs, so its start-up does not load torch."""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from prune_env.errors import CheckpointError, InvalidSettingError, PruneEnvError, UnknownNameError
from prune_env.validation import MAX_SEED


def _first_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


# ------------------------------------------------------------------------------------------------ demo


def _output_shape(output: Any) -> str:
    return str(tuple(output.shape)) if isinstance(output, torch.Tensor) else type(output).__name__


def run_demo(args: argparse.Namespace) -> int:
    """Prune a torchvision model and print its groups, predicted and measured costs."""
    import torchvision

    from prune_env import build_graph, count_macs, count_params, prune

    if args.model not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownNameError(
            f"unknown torchvision model {args.model!r}; see torchvision.models.list_models()"
        )
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.resolution, args.resolution)
    # Some architectures need a minimum (or an exact) input size: find out with one plain forward pass,
    # so the user learns it is the resolution, not the pruning, that does not fit.
    try:
        with torch.no_grad():
            reference = model(x)
    except RuntimeError as exc:
        raise InvalidSettingError(
            f"{args.model} cannot run on {args.resolution}x{args.resolution} inputs ({_first_line(exc)}); "
            "pass a --resolution it accepts, e.g. 224"
        ) from None
    t0 = time.perf_counter()
    graph = build_graph(model, x)
    t1 = time.perf_counter()
    pruned = prune(model, x, args.ratio, graph=graph)
    t2 = time.perf_counter()
    print(graph.table())
    measured = count_macs(pruned, x)
    print(
        f"\n{args.model} at {args.resolution}px, ratio {args.ratio}: "
        f"MACs {graph.base_macs:,} -> {graph.macs(args.ratio):,} predicted, {measured:,} measured; "
        f"params {count_params(model):,} -> {count_params(pruned):,}; "
        f"graph {t1 - t0:.2f}s, prune {t2 - t1:.2f}s"
    )
    with torch.no_grad():
        print(f"output shape {_output_shape(pruned(x))} (unpruned {_output_shape(reference)})")
    return 0 if measured == graph.macs(args.ratio) else 1


def _names_a_path(dataset: str) -> bool:
    """Whether a dataset name points into the file system (``imagefolder:PATH``, ``./data``, ``~/x``...)."""
    separators = {"/", "\\", ":", os.sep, *([os.altsep] if os.altsep else [])}
    return any(c in dataset for c in separators) or dataset.startswith(("~", "."))


def _eval_dataset(given: str | None, meta: dict[str, Any], path: str) -> str:
    """The dataset to score on: ``--dataset``, else the one the model's description names.

    A saved model is someone else's file: its description may name a plain dataset (``digits``), but a
    path in it is never followed — a model downloaded from anywhere must not make ``eval`` read an
    arbitrary directory. Paths are used only when the user passes them with ``--dataset``.
    """
    if given:
        return given
    stored = meta.get("dataset")
    if not isinstance(stored, str) or not stored.strip():
        raise InvalidSettingError(f"{path} does not name its dataset; pass --dataset")
    if _names_a_path(stored):
        raise InvalidSettingError(
            f"{path} names the dataset {stored!r}, which is a path; eval reads a path only when you pass it "
            f"yourself: add --dataset {shlex.quote(stored)} if you trust it, or another --dataset"
        )
    return stored


def _eval_seed(given: int | None, meta: dict[str, Any], path: str) -> int:
    if given is not None:
        return given
    stored = meta.get("seed", 0)
    if type(stored) is not int or not 0 <= stored <= MAX_SEED:
        raise CheckpointError(
            f"{path}: its description's meta.seed {stored!r} is not a dataset seed; pass --seed"
        )
    return stored


def _num_logits(model: torch.nn.Module, x: torch.Tensor, path: str) -> int:
    """How many classes ``model`` scores, from one forward pass on ``x``; it must return (batch, classes)."""
    with torch.no_grad():
        output = model(x)
    if not isinstance(output, torch.Tensor):
        raise CheckpointError(
            f"{path}: the model returns a {type(output).__name__}, not a tensor of class scores; eval scores "
            "classifiers whose forward returns (batch, classes) logits"
        )
    if output.dim() != 2 or output.shape[0] != x.shape[0]:
        raise CheckpointError(
            f"{path}: the model returns shape {list(output.shape)} for a batch of {x.shape[0]}; eval scores "
            "classifiers whose forward returns (batch, classes) logits"
        )
    return int(output.shape[1])


def run_eval(args: argparse.Namespace) -> int:
    """Score a saved pruned model on the test split of its dataset."""
    from prune_env import count_macs, count_params
    from prune_env.checkpoint import load_pruned_with_spec
    from prune_env.data import load
    from prune_env.device import resolve_device
    from prune_env.train import evaluate

    device = resolve_device(args.device)  # a bad device fails before anything is loaded
    model, spec = load_pruned_with_spec(args.path)
    dataset = _eval_dataset(args.dataset, spec["meta"], args.path)
    # The split is seeded: score on the test split the model was never tuned on.
    seed = _eval_seed(args.seed, spec["meta"], args.path)
    shape = list(spec["input_shape"])
    classes = _num_logits(model, torch.zeros(1, *shape), args.path)
    if spec["num_classes"] is not None and classes != spec["num_classes"]:
        raise CheckpointError(
            f"{args.path}: the model scores {classes} classes but its description says num_classes "
            f"{spec['num_classes']}"
        )
    splits = load(dataset, seed=seed)
    data_shape = list(splits.input_shape)
    fix = "pass the --dataset the model was pruned on"
    if data_shape[0] != shape[0]:
        raise InvalidSettingError(
            f"dataset {dataset} has {data_shape[0]}-channel inputs but the model at {args.path} expects "
            f"{shape[0]}-channel inputs (input_shape {shape}); {fix}"
        )
    if data_shape != shape:  # global pooling may accept another size; a flatten -> linear head does not
        try:
            _num_logits(model, torch.zeros(1, *data_shape), args.path)
        except RuntimeError as exc:
            raise InvalidSettingError(
                f"the model at {args.path} (input_shape {shape}) cannot run on dataset {dataset}'s "
                f"{data_shape} inputs ({_first_line(exc)}); {fix}"
            ) from None
    if splits.num_classes != classes:
        raise InvalidSettingError(
            f"dataset {dataset} has {splits.num_classes} classes but the model at {args.path} scores "
            f"{classes}; {fix}"
        )
    model = model.to(device)
    metrics = evaluate(model, getattr(splits, args.split), device=device)
    x = torch.zeros(1, *shape, device=device)
    print(f"model:    {args.path} ({spec['architecture'] or 'custom'} pruned)")
    print(f"dataset:  {dataset} (seed {seed}), {args.split} split, {int(metrics['samples'])} samples")
    print(f"accuracy: {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}")
    print(f"MACs:     {count_macs(model, x):,}")
    print(f"params:   {count_params(model):,}")
    return 0


# ------------------------------------------------------------------------------------------------ export


EXPORT_TOLERANCE = 1e-5  # largest absolute difference from PyTorch's logits an exported model may show


def run_export(args: argparse.Namespace) -> int:
    """Write a saved pruned model as ONNX and/or TorchScript, each checked against PyTorch's outputs."""
    import importlib.util

    from prune_env.app.outputs import check_file_outputs, owning, publish_file
    from prune_env.checkpoint import SPEC_FILE, WEIGHTS_FILE, load_pruned_with_spec

    if args.onnx is None and args.torchscript is None:
        raise InvalidSettingError("say what to write: --onnx FILE, --torchscript FILE, or both")
    if args.onnx is not None:
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise PruneEnvError(
                f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                "(onnxruntime runs the exported model to check it against PyTorch)"
            )
    writers = {"--onnx": (args.onnx, "model.onnx", _onnx_bytes),
               "--torchscript": (args.torchscript, "model.pt", _torchscript_bytes)}  # fmt: skip
    asked = [(option, given, example) for option, (given, example, _) in writers.items() if given is not None]
    model_dir = Path(args.path)

    def check() -> list[Path]:
        return check_file_outputs(
            [(given, option, example) for option, given, example in asked],
            force=args.force,
            inputs=(model_dir / SPEC_FILE, model_dir / WEIGHTS_FILE),
        )

    outs = check()
    # Every output is this process's from here until it is written (and said written): a second export
    # to one of them is refused at once, rather than both writing it and the last silently winning.
    with owning([(out, option) for (option, _, _), out in zip(asked, outs, strict=True)], check) as seen:
        model, spec = load_pruned_with_spec(args.path)
        model.eval()
        # Two samples, so the batch dimension is exported as what it is (dynamic), and a fixed check input.
        x = torch.randn(2, *spec["input_shape"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model(x).numpy()
        # Every export is made and checked in memory first: a failed one writes nothing.
        made = []
        for (option, _, _), out in zip(asked, outs, strict=True):
            data, produced = writers[option][2](model, x)
            error = float(abs(produced - reference).max())
            if not error <= EXPORT_TOLERANCE:
                raise PruneEnvError(
                    f"the {option[2:]} export differs from PyTorch by up to {error:.2e} (tolerance "
                    f"{EXPORT_TOLERANCE:g}); {out} was not written"
                )
            made.append((option, out, data, error))
        for option, out, data, error in made:
            # Written under a temporary name and renamed: a reader never sees half a file, and a failed
            # write leaves any earlier file at the output path as it was.
            publish_file(out, data, force=args.force, option=option, seen=seen[out])
            print(f"wrote {out} (max |difference| from PyTorch {error:.1e})")
    return 0


def _onnx_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[bytes, Any]:
    """The model as ONNX, and what onnxruntime computes with it for ``x``."""
    import onnxruntime

    buffer = io.BytesIO()
    # The torch.export-based exporter needs onnxscript; the TorchScript one needs only onnx.
    dynamo = importlib.util.find_spec("onnxscript") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            buffer,  # type: ignore[arg-type]  # both exporters write to a file object (typed as a path)
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=dynamo,
        )
    data = buffer.getvalue()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, session.run(None, {"input": x.numpy()})[0]


def _torchscript_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[bytes, Any]:
    """The model traced to TorchScript, and what the reloaded trace computes for ``x``."""
    # PyTorch marks TorchScript deprecated in favour of torch.export, but it is what C++ and mobile
    # runtimes load today: asked for by name, it is written without the warning.
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, (x,)), buffer)
        data = buffer.getvalue()
        loaded = torch.jit.load(io.BytesIO(data))
        return data, loaded(x).numpy()
