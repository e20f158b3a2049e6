"""Dataset loaders. Fashion-MNIST from its four standard IDX files (no download: fastff never
touches the network)."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ._validation import check_fits_in_memory

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


def _read_at_most(f, n: int) -> bytearray:
    """Up to n bytes from f, in 1 MiB chunks: never more, whatever the file (or a gzip stream
    that decompresses to far more than it looks) holds."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path, magic: int, item_shape: tuple) -> np.ndarray:
    """One IDX file of unsigned bytes -> uint8 array of shape (n,) + item_shape.

    Checks the magic number, the dimensions in the header and that the data is exactly as long
    as they say (a truncated or padded file is refused). Reads the header first and then at
    most one byte more than it promises, so a damaged header or a gzip bomb cannot make it read
    (or allocate) more than the header's size, itself checked against the memory available.
    """
    path = Path(path)
    n_dims = magic & 0xFF
    header_len = 4 * (1 + n_dims)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = _read_at_most(f, header_len)
            if len(head) < header_len:
                raise DatasetError(
                    f"{path} is too short ({len(head)} bytes) to hold an IDX header. {HOW_TO_GET}"
                )
            header = np.frombuffer(bytes(head), dtype=">u4")
            if int(header[0]) != magic:
                raise DatasetError(
                    f"{path} has magic number {int(header[0])}, expected {magic} "
                    f"(ubyte IDX with {n_dims} dimensions). {HOW_TO_GET}"
                )
            dims = tuple(int(d) for d in header[1:])
            if dims[1:] != item_shape:
                raise DatasetError(f"{path} holds items of shape {dims[1:]}, expected {item_shape}")
            n_data = math.prod(dims)  # Python ints: no overflow for any header
            check_fits_in_memory(n_data, f"{path} (header dimensions {dims})")
            data = _read_at_most(f, n_data + 1)  # one byte more tells a padded file
    except (OSError, EOFError, zlib.error) as exc:  # corrupt or truncated gzip stream
        raise DatasetError(f"cannot read {path}: {exc}. The file is damaged; {HOW_TO_GET}") from exc
    if len(data) != n_data:
        expected = header_len + n_data
        if len(data) < n_data:
            raise DatasetError(
                f"{path} is truncated: {header_len + len(data)} bytes, header "
                f"{dims} needs {expected}. {HOW_TO_GET}"
            )
        raise DatasetError(
            f"{path} is longer than its header says: header {dims} needs "
            f"{expected} bytes. {HOW_TO_GET}"
        )
    # bytearray: a writable array, not a read-only view of a bytes object
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


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
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a str, an os.PathLike or None, got {type(path).__name__} {path!r}"
        )
    folder = Path(path) if path is not None else _default_dir()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"Fashion-MNIST path {folder} is a file, not a folder: give the folder holding the "
            "four IDX files"
        )
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
