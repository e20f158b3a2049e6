"""Safe weight files: `fastff.save(obj, path)` / `fastff.load(path)`, .npz or .safetensors.

A file holds the module's state dict plus JSON metadata naming its kind and constructor config,
so `load` rebuilds the object without the caller repeating it. Nothing is ever unpickled
(.npz members are read with allow_pickle=False and object arrays are refused from their header;
.safetensors is a JSON header and raw little-endian buffers, read here with NumPy alone). The
file is untrusted: its headers are checked first, then every name, shape and dtype is compared
with the module the metadata describes, and only then are the arrays read. The module is rebuilt
under an allocation budget of the bytes its arrays hold (plus 1 MiB), so a file cannot make
`load` allocate more than the arrays it declares: not a huge module from a few bytes of JSON,
nor a decompressed array larger than the module. Writes go to a temporary file that is renamed
over the target, so a failed save never destroys an existing file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zipfile
import zlib

import numpy as np

from ._validation import allocation_budget

FORMAT = "fastff"
FORMAT_VERSION = 1
META_KEY = "__fastff_meta__"
_ST_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not a weight file
# Rebuilding a module may allocate this much more than the file's arrays hold (constructors
# whose memory check rounds up); anything beyond is a config that does not match its arrays.
BUDGET_SLACK = 2**20


class WeightFileError(ValueError):
    """A weight file that is truncated, foreign, or does not match the module it describes."""


def _kind_of(path: str, fmt):
    if fmt is None:
        fmt = "safetensors" if str(path).endswith(".safetensors") else "npz"
    if fmt not in ("npz", "safetensors"):
        raise ValueError(f"format must be 'npz' or 'safetensors', got {fmt!r}")
    return fmt


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".fastff-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj, path, *, format=None) -> None:
    """Write `obj` (an UltraFFF, FFF or fastff.nn module) to `path` (.npz or .safetensors).

    The file is written next to `path` and renamed over it, so a failed save leaves any
    existing file intact."""
    from .module import Module

    if not isinstance(obj, Module):
        raise TypeError(f"save() takes a fastff module, got {type(obj).__name__}")
    path = _check_path(path, writing=True)
    fmt = _kind_of(path, format)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": type(obj).__name__,
        "config": obj.get_config(),
    }
    state = obj.state_dict()
    if META_KEY in state:
        raise ValueError(f"parameter name {META_KEY!r} is reserved")
    if fmt == "npz":
        payload = dict(state)
        payload[META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        _atomic_write(path, lambda f: np.savez(f, **payload))
    else:
        _atomic_write(path, lambda f: _write_safetensors(f, state, {META_KEY: json.dumps(meta)}))


def _write_safetensors(f, state: dict, metadata: dict) -> None:
    header = {"__metadata__": metadata}
    offset = 0
    arrays = []
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        if arr.dtype not in _ST_NAMES:
            raise TypeError(f"cannot store {name!r} of dtype {arr.dtype} in safetensors")
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data buffer to 8 bytes
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
        f.write(arr.tobytes())


def _check_path(path, *, writing: bool) -> str:
    """A weight file's path as a str: a str or os.PathLike, not empty, not a directory; for
    writing, in a directory that exists (so errors name the target, not a temporary file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):  # an os.PathLike of bytes
        raise TypeError(f"path must be a str or os.PathLike of str, got {path!r}")
    if not path:
        raise ValueError("path must not be empty")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a weight file")
    if writing:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot save to {path}: directory {parent} does not exist")
    return path


def _is_count(value) -> bool:
    """A JSON integer >= 0 (JSON true/false are Python bools, refused)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _SafetensorsFile:
    """A .safetensors file whose header has been read and checked; arrays are read on demand.

    The header is untrusted: every entry must have a known dtype, a shape of non-negative
    integers and offsets that lie inside the file and match that shape exactly."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError(f"{path}: truncated safetensors file (no header length)")
            (n_header,) = struct.unpack("<Q", head)
            if n_header > min(MAX_HEADER, size - 8):
                raise WeightFileError(
                    f"{path}: not a safetensors file or truncated (header "
                    f"length {n_header} for a {size}-byte file)"
                )
            try:
                header = json.loads(f.read(n_header))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise WeightFileError(f"{path}: corrupt safetensors header: {exc}") from exc
        if not isinstance(header, dict):
            raise WeightFileError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n_header
        data_size = size - self.data_start
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise WeightFileError(f"{path}: __metadata__ must map names to strings")
        self.meta_text = metadata.get(META_KEY)
        self.entries = {}  # name -> (dtype, shape, start, stop)
        for name, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape, offsets = info["shape"], info["data_offsets"]
                valid = (
                    isinstance(shape, list)
                    and all(_is_count(n) for n in shape)
                    and isinstance(offsets, list)
                    and len(offsets) == 2
                    and all(_is_count(v) for v in offsets)
                )
            except (KeyError, TypeError) as exc:
                raise WeightFileError(f"{path}: bad header entry for {name!r}: {info!r}") from exc
            if not valid:
                raise WeightFileError(f"{path}: bad header entry for {name!r}: {info!r}")
            start, stop = offsets
            expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            if not start <= stop <= data_size or stop - start != expected:
                raise WeightFileError(f"{path}: data of {name!r} is truncated or inconsistent")
            self.entries[name] = (dtype, tuple(shape), start, stop)

    def header(self, name):
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def read(self, name) -> np.ndarray:
        dtype, shape, start, stop = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            data = f.read(stop - start)
        if len(data) != stop - start:  # the file shrank since the header was checked
            raise WeightFileError(f"{self.path}: data of {name!r} is truncated")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    def close(self):
        pass


# Everything that reading a damaged zip or .npy member can raise (NotImplementedError: a zip
# compression method or version that Python does not support).
_NPZ_ERRORS = (
    OSError,
    EOFError,
    KeyError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
)


class _NpzFile:
    """A .npz file whose members' .npy headers have been read and checked; arrays are read on
    demand. Nothing is decompressed beyond the headers until the caller has compared them with
    the module the metadata describes, so a small file cannot make load() allocate more than
    that module's parameters (zip bombs), and object arrays (pickles) are refused unread."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except _NPZ_ERRORS as exc:
            raise WeightFileError(f"{path}: not a readable .npz weight file ({exc})") from exc
        try:
            self.entries = {}  # array name -> (zip member name, dtype, shape)
            for info in self.zip.infolist():
                if not info.filename.endswith(".npy"):
                    raise WeightFileError(f"{path}: unexpected member {info.filename!r}")
                name = info.filename[:-4]
                dtype, shape = self._read_npy_header(info.filename)
                if dtype.hasobject:
                    raise WeightFileError(
                        f"{path}: refused: {name!r} holds Python objects (a "
                        "pickle); fastff never unpickles"
                    )
                self.entries[name] = (info.filename, dtype, shape)
            self.meta_text = self._read_meta()
        except BaseException:
            self.zip.close()
            raise

    def _read_npy_header(self, member: str):
        try:
            with self.zip.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise WeightFileError(
                        f"{self.path}: {member!r} has unsupported .npy version {version}"
                    )
        except WeightFileError:
            raise
        except _NPZ_ERRORS as exc:
            raise WeightFileError(
                f"{self.path}: {member!r} is not a readable .npy array ({exc})"
            ) from exc
        return np.dtype(dtype), tuple(shape)

    def _read_meta(self):
        if META_KEY not in self.entries:
            return None
        _, dtype, shape = self.entries.pop(META_KEY)
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > MAX_HEADER:
            raise WeightFileError(f"{self.path}: corrupt fastff metadata")
        return bytes(self._read_member(META_KEY + ".npy")).decode("utf-8", errors="replace")

    def _read_member(self, member: str) -> np.ndarray:
        try:
            with self.zip.open(member) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except _NPZ_ERRORS as exc:
            raise WeightFileError(f"{self.path}: {member!r} is damaged ({exc})") from exc

    def header(self, name):
        _, dtype, shape = self.entries[name]
        return dtype, shape

    def read(self, name) -> np.ndarray:
        return self._read_member(self.entries[name][0])

    def close(self):
        self.zip.close()


def _rebuild(path: str, meta_text):
    """The module described by a file's metadata (JSON), not yet loaded with its arrays."""
    from .module import build_module

    if meta_text is None:
        raise WeightFileError(
            f"{path}: no fastff metadata; load foreign state dicts with layer.load_state_dict()"
        )
    try:
        meta = json.loads(meta_text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WeightFileError(f"{path}: corrupt fastff metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightFileError(f"{path}: corrupt fastff metadata (not a fastff weight file)")
    kind, config, version = meta.get("kind"), meta.get("config"), meta.get("format_version", 0)
    if not isinstance(kind, str) or not isinstance(config, dict):
        raise WeightFileError(
            f"{path}: corrupt fastff metadata (kind {kind!r}, config {type(config).__name__})"
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeightFileError(f"{path}: corrupt fastff metadata (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise WeightFileError(f"{path}: written by a newer fastff (format version {version})")
    try:
        return build_module(kind, config)
    except (TypeError, ValueError, KeyError, MemoryError, RecursionError) as exc:
        raise WeightFileError(f"{path}: cannot rebuild {kind} from its config: {exc}") from exc


def load(path, *, format=None):
    """Rebuild the module stored at `path` by save().

    Raises WeightFileError (a ValueError) for truncated, foreign or inconsistent files,
    FileNotFoundError for missing ones and IsADirectoryError for directories. The stored
    names, dtypes and shapes are compared with the module the metadata describes before any
    array is read."""
    path = _check_path(path, writing=False)
    fmt = _kind_of(path, format)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weight file at {path}")
    contents = _SafetensorsFile(path) if fmt == "safetensors" else _NpzFile(path)
    try:
        stored = sum(
            math.prod(shape) * dtype.itemsize
            for dtype, shape in map(contents.header, contents.entries)
        )
        with allocation_budget(stored + BUDGET_SLACK, f"the {stored:,} bytes of arrays in {path}"):
            module = _rebuild(path, contents.meta_text)
        kind = type(module).__name__
        expected = module.state_dict()
        missing = sorted(set(expected) - set(contents.entries))
        unexpected = sorted(set(contents.entries) - set(expected))
        if missing or unexpected:
            raise WeightFileError(
                f"{path}: does not match the {kind} it describes: missing "
                f"arrays {missing}, unexpected arrays {unexpected}"
            )
        for name, want in expected.items():
            dtype, shape = contents.header(name)
            if dtype != want.dtype:
                raise WeightFileError(
                    f"{path}: {name!r} is {dtype}, the {kind} stores {want.dtype}"
                )
            if shape != want.shape:
                raise WeightFileError(
                    f"{path}: {name!r} has shape {shape}, the {kind} expects {want.shape}"
                )
        state = {name: contents.read(name) for name in expected}
    finally:
        contents.close()
    try:
        module.load_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise WeightFileError(f"{path}: {exc}") from exc
    return module
