"""fastff.data: the Fashion-MNIST IDX loader on small files written here."""

import gzip
import os

import numpy as np
import pytest

from fastff.data import DatasetError, load_fashion_mnist

from conftest import write_fashion_mnist, write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_loads_what_was_written(tmp_path, gz):
    (x_train, y_train), (x_test, y_test) = write_fashion_mnist(tmp_path, 30, 12, gz=gz)
    (a, b), (c, d) = load_fashion_mnist(tmp_path)
    for got, want in ((a, x_train), (b, y_train), (c, x_test), (d, y_test)):
        np.testing.assert_array_equal(got, want)
    assert a.dtype == np.uint8 and a.shape == (30, 28, 28) and c.shape == (12, 28, 28)
    assert b.dtype == np.int64 and b.shape == (30,)
    a[0, 0, 0] = 1  # writable arrays, not views of immutable bytes


def test_dotted_names_and_fastff_data(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder, 10, 5)
    for f in folder.iterdir():
        f.rename(folder / f.name.replace("-idx", ".idx"))
    monkeypatch.setenv("FASTFF_DATA", str(tmp_path))
    (a, _), (c, _) = load_fashion_mnist()
    assert len(a) == 10 and len(c) == 5


def test_missing_folder_and_file_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFF_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and "FASTFF_DATA" in message
    write_fashion_mnist(tmp_path, 10, 5)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*apt-get"):
        load_fashion_mnist(tmp_path)


def test_default_is_debians_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTFF_DATA", raising=False)
    if os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("the real dataset is installed; test_real_dataset covers the default")
    with pytest.raises(FileNotFoundError, match="/usr/share/datasets/fashion-mnist"):
        load_fashion_mnist()


def corrupt(folder, name, data=None, magic=None, shape=None, gz=False):
    """Rewrite one file of a valid dataset."""
    images = name.endswith("idx3-ubyte")
    array = data if data is not None else np.zeros(shape or ((10, 28, 28) if images else (10,)))
    write_idx(folder / name, array, magic or (2051 if images else 2049), gz)


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("train-images-idx3-ubyte", dict(magic=2049), "magic number 2049, expected 2051"),
        ("train-labels-idx1-ubyte", dict(magic=2051), "magic number 2051, expected 2049"),
        ("t10k-images-idx3-ubyte", dict(shape=(5, 27, 28)), r"shape \(27, 28\)"),
        ("train-labels-idx1-ubyte", dict(shape=(9,)), "10 images but 9 labels"),
        ("train-labels-idx1-ubyte", dict(data=np.full(10, 10)), "label 10"),
    ],
)
def test_bad_contents(tmp_path, name, kwargs, words):
    write_fashion_mnist(tmp_path, 10, 5)
    corrupt(tmp_path, name, **kwargs)
    with pytest.raises(DatasetError, match=words):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda data: data[:-1], "truncated"),
        (lambda data: data[:-790], "truncated"),
        (lambda data: data[:3], "too short"),
        (lambda data: data + b"\0", "longer than its header"),
    ],
)
def test_truncated_or_padded_file(tmp_path, edit, words):
    write_fashion_mnist(tmp_path, 10, 5)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(DatasetError, match=words):
        load_fashion_mnist(tmp_path)


def test_damaged_gzip(tmp_path):
    write_fashion_mnist(tmp_path, 10, 5, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="damaged"):
        load_fashion_mnist(tmp_path)
    with gzip.open(path, "wb") as f:
        f.write(b"\0\0\x08")  # a valid gzip holding too short an IDX header
    with pytest.raises(DatasetError, match="too short"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="the real Fashion-MNIST (apt-get install dataset-fashion-mnist)",
)
def test_real_dataset(monkeypatch):
    monkeypatch.delenv("FASTFF_DATA", raising=False)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
