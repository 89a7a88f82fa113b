"""Bad data refused before any training, in one typed line naming the problem and the fix: image folders,
your own datasets, the batches data-driven importance reads, and a model built for other data."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_output import one_error_line
from torch.utils.data import DataLoader, Dataset, TensorDataset

import prune_env
from prune_env.app import cli
from prune_env.data import as_splits, load, minimum_samples
from prune_env.errors import DatasetError, InvalidSettingError, PruneEnvError
from prune_env.models import get_model
from prune_env.surgery.pruning import prune
from prune_env.user_data import from_datasets


class Items(Dataset):
    """A map-style dataset returning whatever it is given, sample by sample."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class WithTargets(Items):
    """Like torchvision's datasets: labels in a ``targets`` list, samples decoded only when read."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__(items)
        self.targets = [label for _, label in items]


N = 40
X = torch.randn(N, 1, 8, 8)
Y = torch.arange(N) % 2


def _with_nan(index: int) -> torch.Tensor:
    x = X.clone()
    x[index, 0, 3, 3] = float("nan")
    return x


def _pairs(x: torch.Tensor = X, labels: list[Any] | None = None) -> list[Any]:
    return list(zip(x, [int(v) for v in Y] if labels is None else labels, strict=True))


# ------------------------------------------------------------------------------------------------ user datasets

USER_DATA: list[tuple[str, Callable[[], Any], str]] = [
    ("string inputs", lambda: Items([("text", i % 2) for i in range(N)]), "input of type str"),
    ("dict samples", lambda: Items([{"x": X[i], "y": i % 2} for i in range(N)]), "sample 0 is a dict"),
    ("3-tuples", lambda: Items([(X[i], i % 2, "id") for i in range(N)]), "sample 0 is a 3-tuple"),
    ("integer images", lambda: TensorDataset((X * 10).to(torch.uint8), Y), "inputs are torch.uint8"),
    ("one-hot labels", lambda: TensorDataset(X, torch.nn.functional.one_hot(Y, 2)), "one-hot"),
    ("one-hot per sample", lambda: Items(_pairs(labels=list(torch.nn.functional.one_hot(Y, 2)))), "one-hot"),
    ("non-integral float labels", lambda: TensorDataset(X, Y + 0.5), "sample 0 has the label 0.5"),
    ("float labels per sample", lambda: Items(_pairs(labels=[i % 2 + 0.25 for i in range(N)])), "0.25"),
    ("integral float labels", lambda: TensorDataset(X, Y.float()), "labels.long()"),
    ("boolean labels", lambda: TensorDataset(X, Y.bool()), "booleans"),
    ("string labels", lambda: Items(_pairs(labels=["cat", "dog"] * (N // 2))), "label of type str"),
    ("negative labels", lambda: TensorDataset(X, Y - 1), "sample 0 has the label -1"),
    ("float targets", lambda: WithTargets(_pairs(labels=[i % 2 + 0.5 for i in range(N)])), "0.5"),
    ("mixed sizes", lambda: Items([(torch.randn(1, 8 + i % 2, 8), i % 2) for i in range(N)]), "sample 1 has the input shape (1, 9, 8) but sample 0 has (1, 8, 8)"),
    ("train and test sizes", lambda: (TensorDataset(X, Y), TensorDataset(torch.randn(10, 1, 6, 6), Y[:10])), "the test inputs have the shape (1, 6, 6) but the training inputs have (1, 8, 8)"),
    ("validation size", lambda: (TensorDataset(X, Y), Items(_pairs(torch.randn(N, 1, 4, 4))), TensorDataset(X, Y)), "the validation inputs have the shape (1, 4, 4)"),
    ("test labels unseen in training", lambda: (TensorDataset(X, Y), TensorDataset(X[:10], Y[:10] + 3)), "the test data's sample 0 has the label 3, which no training sample has"),
    ("labels beyond num_classes", lambda: lambda: from_datasets(Items(_pairs(labels=[i % 3 for i in range(N)])), None, num_classes=2), "has the label 2, but num_classes=2"),
    ("a class of one", lambda: TensorDataset(X[:20], torch.tensor([0] + [1] * 19)), "class 0 has 1 sample(s); the stratified split (holding out 20%, then 10% of the rest) needs at least 3 samples per class"),
    ("too few in all", lambda: TensorDataset(X[:8], Y[:8]), "8 samples are too few; the stratified split (holding out 20%, then 10% of the rest) needs at least 3 samples per class and 14 in all"),
    ("NaN in memory", lambda: TensorDataset(_with_nan(7), Y), "the training data has NaN or inf in the input of sample 7"),
    ("NaN per sample", lambda: Items(_pairs(_with_nan(5))), "the training data has NaN or inf in the input of sample 5"),
    ("NaN in test", lambda: (TensorDataset(X, Y), DataLoader(TensorDataset(_with_nan(2), Y))), "the test data has NaN or inf in the input of sample 2"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "message"), [(m, msg) for _, m, msg in USER_DATA], ids=[c[0] for c in USER_DATA]
)
def test_bad_user_data_is_refused_naming_the_split_and_sample(make: Callable[[], Any], message: str) -> None:
    data = make()  # data for as_splits, or a call of from_datasets with its own arguments
    with pytest.raises(DatasetError, match=re.escape(message)):
        data() if callable(data) else as_splits(data)


def test_good_user_data_still_passes_and_is_read_once() -> None:
    reads = []

    class Counting(Items):
        def __getitem__(self, i: int) -> Any:
            reads.append(i)
            return super().__getitem__(i)

    splits = as_splits(Counting(_pairs()))
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 2
    assert sorted(reads) == list(range(N))  # every sample checked, none read twice


def test_the_split_sizes_needed_are_what_the_split_takes() -> None:
    for classes in (2, 3, 10):
        needed = minimum_samples(classes, [0.2, 0.1])
        enough = TensorDataset(torch.randn(needed, 1, 2, 2), torch.arange(needed) % classes)
        as_splits(enough)  # exactly enough splits
        with pytest.raises(DatasetError, match=f"needs at least 3 samples per class and {needed} in all"):
            as_splits(TensorDataset(torch.randn(needed - 1, 1, 2, 2), torch.arange(needed - 1) % classes))


def test_nan_data_is_named_as_data_by_a_problem_before_anything_is_built() -> None:
    model = get_model("tiny", 2, 1)
    with pytest.raises(DatasetError, match="training data has NaN or inf in the input of sample 7"):
        prune_env.PruningProblem(model, TensorDataset(_with_nan(7), Y), progress=False)


# ------------------------------------------------------------------------------------------------ image folders


def _images(
    directory: Path, counts: dict[str, int], sizes: tuple[tuple[int, int], ...] = ((12, 10),)
) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                directory / name / f"{i}.png"
            )
    return directory


def _empty_class(d: Path) -> None:
    _images(d, {"a": 15, "b": 15})
    (d / "c").mkdir()


def _garbage(d: Path) -> None:
    _images(d, {"a": 15, "b": 15})
    (d / "b" / "notes.png").write_bytes(b"not an image")


def _truncated(d: Path) -> None:
    _images(d, {"a": 15, "b": 15})
    path = d / "a" / "3.png"
    path.write_bytes(path.read_bytes()[:-40])


def _train_and_test(d: Path) -> None:
    _images(d / "train", {"a": 15, "b": 15})
    _images(d / "test", {"a": 3, "b": 3})


def _other_test_classes(d: Path) -> None:
    _images(d / "train", {"a": 15, "b": 15})
    _images(d / "test", {"a": 3, "c": 3})


IMAGE_FOLDERS: list[tuple[str, Callable[[Path], Any], dict[str, Any], str]] = [
    ("empty class", _empty_class, {}, "class folder .*/c has no images"),
    ("no class folders", lambda d: d.mkdir(exist_ok=True), {}, "has no class folders"),
    ("a class too small", lambda d: _images(d, {"a": 15, "b": 2}), {}, "class 'b' has 2 sample\\(s\\); the stratified split .* needs at least 3 samples per class"),
    ("too few in all", lambda d: _images(d, {"a": 4, "b": 4}), {}, "8 samples are too few; .* 14 in all for 2 classes"),
    ("too few to hold out val", _train_and_test, {"val_fraction": 0.01}, "train: 30 samples are too few; the stratified split \\(holding out 1%\\) needs at least 2 samples per class and 101 in all"),
    ("not an image", _garbage, {}, "notes.png is not a readable image"),
    ("truncated image", _truncated, {}, "3.png is not a readable image"),
    ("other classes in test", _other_test_classes, {"val_fraction": 0.2}, "test has the classes \\['a', 'c'\\] but .*train has \\['a', 'b'\\]"),
    ("image size 0", lambda d: _images(d, {"a": 15, "b": 15}), {"image_size": 0}, "image_size must be an integer >= 1"),
    ("image size huge", lambda d: _images(d, {"a": 15, "b": 15}), {"image_size": 10**6}, "<= 4096"),
    ("image size float", lambda d: _images(d, {"a": 15, "b": 15}), {"image_size": 7.5}, "image_size must be an integer"),
    ("val fraction 1", lambda d: _images(d, {"a": 15, "b": 15}), {"val_fraction": 1.0}, "val_fraction must be a fraction in \\(0, 1\\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "kwargs", "message"), [c[1:] for c in IMAGE_FOLDERS], ids=[c[0] for c in IMAGE_FOLDERS]
)
def test_bad_image_folders_are_refused_before_loading(
    tmp_path: Path, build: Callable[[Path], Any], kwargs: dict[str, Any], message: str
) -> None:
    build(tmp_path / "data")
    with pytest.raises(PruneEnvError, match=message):
        load(f"imagefolder:{tmp_path / 'data'}", **{"image_size": 8, **kwargs})


def test_a_garbage_file_is_refused_when_another_library_patched_image_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ultralytics replaces PIL.Image.open process-wide with one that, on a file PIL cannot identify,
    # imports a HEIF plugin (and raises ModuleNotFoundError where it is missing).
    from PIL import Image

    original = Image.open

    def patched(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(path, *args, **kwargs)
        except Image.UnidentifiedImageError:
            raise ModuleNotFoundError("No module named 'pi_heif'") from None

    monkeypatch.setattr(Image, "open", patched)
    _garbage(tmp_path / "data")
    with pytest.raises(
        PruneEnvError, match=r"notes.png is not a readable image \(No module named 'pi_heif'\)"
    ):
        load(f"imagefolder:{tmp_path / 'data'}", image_size=8)


def test_a_jpeg_that_fails_to_decode_is_named_while_loading(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.jpg"
            )
    broken = tmp_path / "a" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])  # a header intact, pixels cut
    splits = load(f"imagefolder:{tmp_path}", image_size=8)

    def read_all() -> None:
        for part in (splits.train, splits.val, splits.test):
            for i in range(len(part)):  # type: ignore[arg-type]
                part[i]

    with pytest.raises(DatasetError, match=re.escape("0.jpg is not a readable image")):
        read_all()


def test_images_of_mixed_sizes_and_modes_become_inputs_of_the_size_costed(tmp_path: Path) -> None:
    from PIL import Image

    _images(tmp_path, {"a": 15, "b": 15}, sizes=((5, 40), (40, 5), (9, 9), (100, 60)))
    Image.new("L", (30, 17)).save(tmp_path / "a" / "gray.png")
    Image.new("RGBA", (3, 70)).save(tmp_path / "b" / "alpha.png")
    splits = load(f"imagefolder:{tmp_path}", image_size=8)
    shapes = {
        tuple(part[i][0].shape) for part in (splits.train, splits.val, splits.test) for i in range(len(part))
    }  # type: ignore[arg-type]
    assert shapes == {splits.input_shape} == {(3, 8, 8)}
    assert tuple(splits.example_inputs(1).shape[1:]) == splits.input_shape  # what the costs are traced with


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-size", "0"], "--image-size must be an integer >= 1"),
        ([], "class folder .*/c has no images"),
    ],
)
def test_the_command_line_refuses_bad_image_folders_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _empty_class(tmp_path / "data")
    out = tmp_path / "run"
    argv = [
        "search",
        "--model",
        "tiny",
        "--dataset",
        f"imagefolder:{tmp_path / 'data'}",
        "--out",
        str(out),
        *args,
    ]
    assert cli.main(argv) == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written


# ------------------------------------------------------------------------------------------------ importance batches

_GOOD = (X[:8], Y[:8])

BATCHES: list[tuple[str, Any, type[Exception], str]] = [
    ("labels of another length", [(X[:4], Y[:3])], DatasetError, "batch 0 of the batch source has 4 inputs but labels of shape \\(3,\\)"),
    ("wrong input channels", [_GOOD, (torch.randn(4, 3, 8, 8), Y[:4])], DatasetError, "layer 'stem.0' takes 1 input channels but receives 3 from batch 1"),
    ("non-tensor items", [("inputs", "labels")], InvalidSettingError, "batch 0 of the batch source has inputs of type str"),
    ("not pairs", [X[:4]], InvalidSettingError, "batch 0 of the batch source is a Tensor"),
    ("empty source", [], InvalidSettingError, "yielded no batch"),
    ("NaN inputs", [(_with_nan(1)[:8], Y[:8])], DatasetError, "batch 0 of the batch source has NaN or inf"),
    ("float labels", [(X[:4], Y[:4].float())], DatasetError, "batch 0 of the batch source has torch.float32 labels"),
    ("integer inputs", [(X[:4].long(), Y[:4])], DatasetError, "batch 0 of the batch source has torch.int64 inputs"),
    ("a source returning nothing iterable", None, InvalidSettingError, "the batch source returned a NoneType"),
]  # fmt: skip


@pytest.mark.parametrize("importance", ["taylor", "hrank"])
@pytest.mark.parametrize(("items", "error", "message"), [c[1:] for c in BATCHES], ids=[c[0] for c in BATCHES])
def test_bad_importance_batches_are_named(
    importance: str, items: Any, error: type[Exception], message: str
) -> None:
    model = get_model("tiny", 2, 1).eval()
    with pytest.raises(error, match=message):
        prune(model, torch.zeros(1, 1, 8, 8), 0.5, importance=importance, batches=lambda: items)


def test_taylor_refuses_labels_the_model_has_no_output_for() -> None:
    model = get_model("tiny", 2, 1).eval()
    with pytest.raises(DatasetError, match=r"labels 5\.\.6, but the model has 2 outputs"):
        prune(model, torch.zeros(1, 1, 8, 8), 0.5, importance="taylor", batches=lambda: [(X[:4], Y[:4] + 5)])


def test_a_batch_source_that_is_not_callable_is_refused_up_front() -> None:
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    with pytest.raises(InvalidSettingError, match="batches=lambda: loader"):
        prune(
            get_model("tiny", 2, 1).eval(), torch.zeros(1, 1, 8, 8), 0.5, importance="taylor", batches=loader
        )  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ model and data


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: get_model("tiny", 2, 3), "layer 'stem.0' takes 3 input channels but receives 1 from the dataset's inputs of shape \\(1, 8, 8\\): build the model for this data \\(in_channels=1, num_classes=2"),
        (lambda: get_model("tiny", 10, 1), "the dataset has 2 classes, so it must be \\(2,\\): build the model for this data \\(in_channels=1, num_classes=2"),
        (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 2)), "layer '1' takes 100 input features but receives 64"),
    ],
    ids=["channels", "classes", "input size"],
)  # fmt: skip
def test_a_model_built_for_other_data_is_one_line(model: Callable[[], torch.nn.Module], message: str) -> None:
    with pytest.raises(InvalidSettingError, match=message):
        prune_env.PruningProblem(model(), TensorDataset(X, Y), progress=False)
