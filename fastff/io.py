"""Safe weight files: `fastff.save(obj, path)` / `fastff.load(path)`, .npz or .safetensors.

A file holds the module's state dict plus JSON metadata naming its kind and constructor config,
so `load` rebuilds the object without the caller repeating it. Nothing is ever unpickled
(.npz is read with allow_pickle=False; .safetensors is a JSON header and raw little-endian
buffers, read here with NumPy alone). Every key, shape and dtype is checked against the module the
metadata describes before any value is used. Writes go to a temporary file that is renamed over
the target, so a failed save never destroys an existing file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
import zlib

import numpy as np

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

    The file holds obj.state_dict() (anchor keys and shapes, the module's dtype) and JSON
    metadata with the module's kind and get_config(), so load() needs nothing else. format:
    "npz" or "safetensors"; by default ".safetensors" paths get safetensors, others npz. An
    existing file is replaced only once the new one is complete.
    """
    from .module import Module

    if not isinstance(obj, Module):
        raise TypeError(f"save() takes a fastff module, got {type(obj).__name__}")
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


def _read_safetensors(path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path}: truncated safetensors file (no header length)")
        (n_header,) = struct.unpack("<Q", head)
        if n_header > min(MAX_HEADER, size - 8):
            raise WeightFileError(
                f"{path}: not a safetensors file or truncated (header length "
                f"{n_header} for a {size}-byte file)"
            )
        try:
            header = json.loads(f.read(n_header))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightFileError(f"{path}: corrupt safetensors header: {exc}") from exc
        if not isinstance(header, dict):
            raise WeightFileError(f"{path}: corrupt safetensors header")
        data = f.read()
    metadata = header.pop("__metadata__", {}) or {}
    state = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, stop = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightFileError(f"{path}: bad header entry for {name!r}: {info!r}") from exc
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= start <= stop <= len(data)) or stop - start != expected:
            raise WeightFileError(f"{path}: data of {name!r} is truncated or inconsistent")
        state[name] = np.frombuffer(data[start:stop], dtype=dtype).reshape(shape).copy()
    return state, metadata.get(META_KEY)


def _read_npz(path: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except ValueError as exc:  # pickled data / object arrays: refused, never executed
        raise WeightFileError(f"{path}: refused: {exc}") from exc
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise WeightFileError(f"{path}: not a readable .npz weight file ({exc})") from exc
    meta = state.pop(META_KEY, None)
    if meta is not None:
        if meta.dtype != np.uint8 or meta.ndim != 1:
            raise WeightFileError(f"{path}: corrupt fastff metadata")
        meta = bytes(meta).decode("utf-8", errors="replace")
    return state, meta


def load(path, *, format=None):
    """Rebuild the module stored at `path` by save(): a new module of the saved kind, config,
    dtype and weights, on the CPU. Raises WeightFileError (a ValueError) for truncated,
    foreign or inconsistent files and FileNotFoundError for missing ones. Nothing is
    unpickled. For a foreign state dict (e.g. PyTorch's), use layer.load_state_dict() or
    fastff.interop."""
    from .module import build_module

    fmt = _kind_of(path, format)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weight file at {path}")
    state, meta_text = _read_safetensors(path) if fmt == "safetensors" else _read_npz(path)
    if meta_text is None:
        raise WeightFileError(
            f"{path}: no fastff metadata; load foreign state dicts with layer.load_state_dict()"
        )
    try:
        meta = json.loads(meta_text)
        kind, config = meta["kind"], meta["config"]
        if meta.get("format") != FORMAT:
            raise KeyError("format")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightFileError(f"{path}: corrupt fastff metadata ({exc})") from exc
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise WeightFileError(
            f"{path}: written by a newer fastff (format version {meta['format_version']})"
        )
    try:
        module = build_module(kind, config)
    except (TypeError, ValueError, KeyError, MemoryError) as exc:
        raise WeightFileError(f"{path}: cannot rebuild {kind} from its config: {exc}") from exc
    expected = module.state_dict()
    for name, arr in state.items():
        if name in expected and arr.dtype != expected[name].dtype:
            raise WeightFileError(
                f"{path}: {name!r} is {arr.dtype}, the {kind} stores {expected[name].dtype}"
            )
    try:
        module.load_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise WeightFileError(f"{path}: {exc}") from exc
    return module
