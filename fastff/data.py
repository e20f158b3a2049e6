"""Dataset loaders. Fashion-MNIST from its four standard IDX files (no download: fastff never
touches the network)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
N_CLASSES = 10
HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
    f"{SYSTEM_FASHION_MNIST}), or put the four files (optionally .gz) from "
    "https://github.com/zalandoresearch/fashion-mnist in $FASTFF_DATA/fashion-mnist "
    "or in a folder passed as path."
)


class DatasetError(ValueError):
    """A dataset file exists but is not what it should be (wrong magic, size or contents)."""


def _default_dir() -> Path:
    base = os.environ.get("FASTFF_DATA")
    if base:
        return Path(base) / "fashion-mnist"
    return Path(SYSTEM_FASHION_MNIST)


def _find(folder: Path, stem: str) -> Path:
    """The file for `stem` (e.g. "train-images-idx3-ubyte") in folder: plain or .gz, with the
    dash of the original names or the dot some mirrors use ("train-images.idx3-ubyte")."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder} (looked for {stem}, {stem}.gz, "
        f"{dotted}, {dotted}.gz). {HOW_TO_GET}"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # corrupt or truncated gzip stream
        raise DatasetError(f"cannot read {path}: {exc}. The file is damaged; {HOW_TO_GET}") from exc


def read_idx(path, magic: int, item_shape: tuple) -> np.ndarray:
    """One IDX file of unsigned bytes -> uint8 array of shape (n,) + item_shape.

    Checks the magic number, the dimensions in the header and that the data is exactly as long
    as they say (a truncated or padded file is refused).
    """
    path = Path(path)
    data = _read_bytes(path)
    n_dims = magic & 0xFF
    header_len = 4 * (1 + n_dims)
    if len(data) < header_len:
        raise DatasetError(
            f"{path} is too short ({len(data)} bytes) to hold an IDX header. {HOW_TO_GET}"
        )
    header = np.frombuffer(data, dtype=">u4", count=1 + n_dims)
    if int(header[0]) != magic:
        raise DatasetError(
            f"{path} has magic number {int(header[0])}, expected {magic} "
            f"(ubyte IDX with {n_dims} dimensions). {HOW_TO_GET}"
        )
    dims = tuple(int(d) for d in header[1:])
    if dims[1:] != item_shape:
        raise DatasetError(f"{path} holds items of shape {dims[1:]}, expected {item_shape}")
    expected = header_len + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DatasetError(
            f"{path} is {what}: {len(data)} bytes, header {dims} needs {expected}. {HOW_TO_GET}"
        )
    # bytearray: a writable array, not a read-only view of the bytes object
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header_len).reshape(dims)


def _load_split(folder: Path, prefix: str):
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"), IMAGES_MAGIC, (28, 28))
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(labels_path, LABELS_MAGIC, ())
    if len(labels) != len(images):
        raise DatasetError(f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() >= N_CLASSES:
        raise DatasetError(
            f"{labels_path} has label {int(labels.max())}; Fashion-MNIST "
            f"labels are 0..{N_CLASSES - 1}"
        )
    return images, labels.astype(np.int64)


def load_fashion_mnist(path=None):
    """Fashion-MNIST -> ((x_train, y_train), (x_test, y_test)).

    Images are uint8 of shape (N, 28, 28), labels int64 of shape (N,) in 0..9 (60000 training
    and 10000 test rows for the real dataset). Files are read from the folder `path`, else
    $FASTFF_DATA/fashion-mnist, else /usr/share/datasets/fashion-mnist (Debian's
    dataset-fashion-mnist package). Missing files raise FileNotFoundError, damaged ones
    DatasetError (a ValueError); both say where fastff looked and how to get the data.
    """
    folder = Path(path) if path is not None else _default_dir()
    if not folder.is_dir():
        source = (
            "path"
            if path is not None
            else ("$FASTFF_DATA/fashion-mnist" if os.environ.get("FASTFF_DATA") else "the default")
        )
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} ({source}) does not exist. {HOW_TO_GET}"
        )
    return _load_split(folder, "train"), _load_split(folder, "t10k")
