from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from prune_env import data
from prune_env.batches import iterate_batches
from prune_env.data import FASHION_SYSTEM_DIR, Splits, load, read_idx
from prune_env.errors import DatasetNotFoundError, PruneEnvError, UnknownNameError

HAS_FASHION = FASHION_SYSTEM_DIR.is_dir()


def test_digits_sizes_and_shapes(digits: Splits) -> None:
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1221, 216, 360)
    assert digits.num_classes == 10
    assert digits.in_channels == 1
    assert digits.input_shape == (1, 8, 8)
    x, y = digits.train[0]
    assert x.shape == (1, 8, 8)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    # Normalised: roughly zero mean, unit variance (raw values are 0..16).
    xs = digits.train.tensors[0]
    assert abs(float(xs.mean())) < 0.1
    assert abs(float(xs.std()) - 1.0) < 0.1


def test_digits_splits_partition_the_dataset(digits: Splits) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    xs = torch.cat([ds.tensors[0] for ds in (digits.train, digits.val, digits.test)]).numpy()
    ys = torch.cat([ds.tensors[1] for ds in (digits.train, digits.val, digits.test)]).numpy()
    # Normalisation is one increasing affine map, so replacing each value by its rank among the distinct
    # values recovers the raw integers exactly (both sides use all 17 values 0..16).
    ranks = np.searchsorted(np.unique(xs), xs).astype(np.int64)[:, 0]
    raw_ranks = np.searchsorted(np.unique(raw.images), raw.images).astype(np.int64)

    def multiset(images: np.ndarray, labels: np.ndarray) -> Counter:
        return Counter(im.tobytes() + bytes([int(lab)]) for im, lab in zip(images, labels, strict=True))

    # Every sample of load_digits is in exactly one split (a multiset equality, so images that the raw
    # data itself duplicates are handled): the splits are disjoint and lose nothing.
    assert multiset(ranks, ys) == multiset(raw_ranks, raw.target)
    assert len(ys) == len(raw.target) == 1797


def test_splits_are_stratified(digits: Splits) -> None:
    for ds in (digits.val, digits.test):
        counts = np.bincount(ds.tensors[1].numpy(), minlength=10)
        expected = len(ds) / 10
        assert counts.min() >= expected - 3
        assert counts.max() <= expected + 3


def test_splits_deterministic_for_a_seed() -> None:
    a, b, c = load("digits", seed=0), load("digits", seed=0), load("digits", seed=1)
    for split in ("train", "val", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.val.tensors[1], c.val.tensors[1]) or not torch.equal(
        a.val.tensors[0], c.val.tensors[0]
    )


def test_splits_is_frozen(digits: Splits) -> None:
    with pytest.raises(AttributeError):
        digits.test = digits.val  # type: ignore[misc]


def test_unknown_dataset_name_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        load("mnist-but-wrong")
    message = str(info.value)
    for name in ("digits", "fashion-mnist", "cifar10", "imagefolder:PATH", "fake"):
        assert name in message
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, PruneEnvError)


def test_fashion_missing_files_says_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as info:
        load("fashion-mnist", root=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download=True" in message
    assert data.DATA_ENV in message
    assert str(tmp_path) in message
    assert isinstance(info.value, FileNotFoundError)


def test_cifar_missing_files_says_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(DatasetNotFoundError, match=r"download=True[\s\S]*cifar-10-batches-py"):
        load("cifar10", root=tmp_path)


def test_imagefolder_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        load(f"imagefolder:{tmp_path / 'missing'}")


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_reads_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_y, test_y = np.arange(100) % 10, np.arange(30) % 10
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28)), gz)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y, gz)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)), gz)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y, gz)
    splits = load("fashion-mnist", root=tmp_path, val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 30)
    assert splits.input_shape == (1, 28, 28)
    assert sorted(splits.val.tensors[1].tolist()) == sorted(list(range(10)) * 2)


def test_read_idx_detects_truncation(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((10, 4, 4)), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_splits() -> None:
    splits = load("fashion-mnist", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.input_shape == (1, 28, 28)
    assert splits.num_classes == 10
    # train + val is exactly the official training set (as a multiset of images and labels).
    official_x = read_idx(FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz")
    xs = torch.cat([splits.train.tensors[0], splits.val.tensors[0]])
    back = torch.round((xs * data.FASHION_STD + data.FASHION_MEAN) * 255).to(torch.uint8).numpy()[:, 0]
    assert sorted(map(bytes, back.reshape(len(back), -1))) == sorted(
        map(bytes, official_x.reshape(60000, -1))
    )
    assert np.bincount(splits.val.tensors[1].numpy()).tolist() == [600] * 10


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    splits = load(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0.2)
    assert splits.num_classes == 2
    assert splits.input_shape == (3, 8, 8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30
    assert len(splits.test) == 6
    x, y = splits.val[0]
    assert x.shape == (3, 8, 8)
    assert y in (0, 1)


def test_fake_dataset() -> None:
    a, b = load("fake"), load("fake")
    assert a.input_shape == (3, 16, 16)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0][:64], a.val.tensors[0])


def test_iterate_batches_covers_every_sample_once(digits: Splits) -> None:
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in iterate_batches(digits.val, 50, shuffle=True, generator=gen)])
    assert len(seen) == len(digits.val)
    assert sorted(seen.tolist()) == sorted(digits.val.tensors[1].tolist())
    sizes = [len(y) for _, y in iterate_batches(digits.val, 50, drop_last=True)]
    assert sizes == [50] * (len(digits.val) // 50)
