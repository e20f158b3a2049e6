"""Safe weight files: `fastff.save(obj, path)` / `fastff.load(path)`, .npz or .safetensors.

A file holds the module's state dict plus JSON metadata naming its kind and constructor config,
so `load` rebuilds the object without the caller repeating it. Nothing is ever unpickled
(.npz members are read with allow_pickle=False and object arrays are refused from their header;
.safetensors is a JSON header and raw little-endian buffers, read here with NumPy alone). The
file is untrusted: only regular files are opened, its headers are checked first (as strictly
as the reference safetensors library does), then every name, shape and dtype is compared with
the module the metadata describes, and only then are the arrays read, each straight into the
module's parameter in chunks. The module is rebuilt without initialising its parameters, under
an allocation budget of the bytes its arrays hold (plus 1 MiB), after those bytes were checked
against the memory available: a file cannot make `load` allocate more than the arrays it
declares (peak resident memory about 1.1x their bytes), not a huge module from a few bytes of
JSON, nor a decompressed array larger than the module, nor millions of modules. Writes go to a
temporary file that is renamed over the target, so a failed save never destroys an existing
file; the target keeps its permissions, and a symlink is written through to its target.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import stat
import struct
import tempfile
import zipfile
import zlib

import numpy as np

from ._validation import BFLOAT16, allocation_budget, available_memory_bytes

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
if BFLOAT16 is not None:  # ml_dtypes' bfloat16 is the format's BF16
    _ST_DTYPES["BF16"] = BFLOAT16
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not a weight file
# fastff's own metadata (kind and config) is small: a Sequential of MAX_MODULES modules takes
# well under 1 MiB. Parsing 100 MB of JSON took tens of seconds and gigabytes.
MAX_META = 4 * 2**20
MAX_MODULES = 10_000  # modules one file may describe
MAX_NESTING = 32  # Sequentials inside Sequentials (300 deep broke repr())
_CHUNK = 4 * 2**20  # arrays are read into their parameters this many bytes at a time
# Rebuilding a module may allocate this much more than the file's arrays hold (constructors
# whose memory check rounds up); anything beyond is a config that does not match its arrays.
BUDGET_SLACK = 2**20


class WeightFileError(ValueError):
    """A weight file that is truncated, foreign, or does not match the module it describes."""


def _no_duplicate_keys(pairs):
    """json object_pairs_hook: refuse duplicate keys (json keeps the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _parse_json(text: str, path: str, what: str):
    """JSON text -> object, any failure a WeightFileError (ValueError covers decoding errors,
    duplicate keys and integers of more than 4300 digits; RecursionError deep nesting)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise WeightFileError(f"{path}: corrupt {what} ({exc})") from exc


def _kind_of(path: str, fmt):
    if fmt is None:
        fmt = "safetensors" if str(path).endswith(".safetensors") else "npz"
    if fmt not in ("npz", "safetensors"):
        raise ValueError(f"format must be 'npz' or 'safetensors', got {fmt!r}")
    return fmt


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _temporary_prefix(pid: int) -> str:
    """Temporary files are named .fastff-<host>-<pid>-<random>.tmp, so that a later save can
    tell those left by a process that died (killed mid-write) from those being written."""
    return f".fastff-{_host_tag()}-{pid}-"


_TEMPORARY = re.compile(r"\.fastff-([A-Za-z0-9]+)-(\d+)-[^/]*\.tmp\Z")


def _remove_stale_temporaries(directory: str) -> None:
    """Delete the temporaries of saves into `directory` that provably cannot finish: named for
    this host, owned by this user, and whose process no longer exists. Others are left."""
    host, uid = _host_tag(), os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match.group(1) != host or int(match.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(2)), 0)
            continue  # alive (or another user's): maybe still writing
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and (uid is None or info.st_uid == uid):
                os.unlink(entry.path)
        except OSError:
            pass


def _new_file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask (read from /proc where
    possible, as os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str, write) -> None:
    """Write through `write(file)` to a temporary file renamed over `path`. A symlink at path
    is written through (its final target is replaced); the target keeps its permission bits
    (a new file gets those of open()). Errors name `path`, never the temporary file."""
    target = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(target)) or "."
    _remove_stale_temporaries(directory)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=_temporary_prefix(os.getpid()), suffix=".tmp", dir=directory
        )
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise _named(exc, path) from exc
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _named(exc: OSError, path: str) -> OSError:
    """exc again (same class, same errno) with a message naming the user's path."""
    reason = exc.strerror or str(exc)
    if exc.errno is None:
        return type(exc)(f"cannot save to {path}: {reason}")
    return OSError(exc.errno, f"cannot save to {path}: {reason}")


def save(obj, path, *, format=None) -> None:
    """Write `obj` (an UltraFFF, FFF or fastff.nn module, or a fitted fastff.sklearn
    estimator) to `path` (.npz or .safetensors).

    The file is written next to `path` and renamed over it, so a failed save leaves any
    existing file intact."""
    from .module import Module

    extra = {}
    if not isinstance(obj, Module) and hasattr(obj, "__fastff_save__"):
        # an estimator of fastff.sklearn: its network plus JSON of its parameters and fitted
        # attributes, rebuilt by load() through fastff.sklearn (never unpickled)
        obj, extra["estimator"] = obj.__fastff_save__()
    if not isinstance(obj, Module):
        raise TypeError(
            f"save() takes a fastff module or fitted fastff.sklearn estimator, got "
            f"{type(obj).__name__}"
        )
    path = _check_path(path, writing=True)
    fmt = _kind_of(path, format)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": type(obj).__name__,
        "config": obj.get_config(),
        **extra,
    }
    state = obj.state_dict()
    if META_KEY in state:
        raise ValueError(f"parameter name {META_KEY!r} is reserved")
    if fmt == "npz":
        if any(a.dtype == BFLOAT16 for a in state.values()):
            raise TypeError(
                f"cannot save bfloat16 parameters to {path}: .npz has no bfloat16 type (NumPy "
                "would store untyped bytes); save to .safetensors, which stores BF16"
            )
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


def _open_regular(path: str):
    """(binary file, size) of the regular file at path. Opened without blocking (open() of a
    FIFO waits for a writer) and checked on the open descriptor, so a FIFO, a device such as
    /dev/zero (endless), a socket or a symlink to one is refused before anything is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"no weight file at {path}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(f"{path} is a directory, not a weight file")
        if not stat.S_ISREG(info.st_mode):
            raise WeightFileError(
                f"{path}: not a regular file (a FIFO, device or socket); refused unread"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _read_exact(f, n: int, path: str, name: str) -> bytes:
    """n bytes from f, or a WeightFileError if the file (or zip member) ends first."""
    parts, left = [], n
    while left > 0:
        data = f.read(left)
        if not data:
            raise WeightFileError(f"{path}: data of {name!r} is truncated")
        parts.append(data)
        left -= len(data)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _read_into(target: np.ndarray, f, dtype: np.dtype, path: str, name: str) -> None:
    """Fill `target` (any strides) with its size's worth of `dtype` values read from f in C
    order, at most _CHUNK bytes at a time: no full-size temporary array."""
    if target.size == 0:
        return
    if target.ndim == 0 or target.size * dtype.itemsize <= _CHUNK:
        data = _read_exact(f, target.size * dtype.itemsize, path, name)
        target[...] = np.frombuffer(data, dtype).reshape(target.shape)
        return
    row_bytes = target[0].size * dtype.itemsize
    if row_bytes > _CHUNK:
        for i in range(target.shape[0]):
            _read_into(target[i], f, dtype, path, name)
        return
    step = _CHUNK // row_bytes
    for start in range(0, target.shape[0], step):
        block = target[start : start + step]
        data = _read_exact(f, block.size * dtype.itemsize, path, name)
        block[...] = np.frombuffer(data, dtype).reshape(block.shape)


class _SafetensorsFile:
    """A .safetensors file whose header has been read and checked; arrays are read on demand.

    The header is untrusted and checked as the reference library checks it: UTF-8 JSON
    starting with '{' with no duplicate keys; every entry has a known dtype, a shape of
    non-negative integers and offsets matching that shape exactly; and the entries, sorted by
    offset, tile the data buffer: no gap, no overlap, no trailing bytes."""

    def __init__(self, f, path: str, size: int):
        self.f, self.path = f, path
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path}: truncated safetensors file (no header length)")
        (n_header,) = struct.unpack("<Q", head)
        if n_header > min(MAX_HEADER, size - 8):
            raise WeightFileError(
                f"{path}: not a safetensors file or truncated (header "
                f"length {n_header} for a {size}-byte file)"
            )
        raw = _read_exact(f, n_header, path, "header")
        try:
            text = raw.decode("utf-8")  # strictly: json.loads(bytes) would take UTF-16 too
        except UnicodeDecodeError as exc:
            raise WeightFileError(f"{path}: corrupt safetensors header: {exc}") from exc
        if not text.startswith("{"):
            raise WeightFileError(f"{path}: corrupt safetensors header (does not start with '{{')")
        header = _parse_json(text, path, "safetensors header")
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
        end = 0
        for name, (_, _, start, stop) in sorted(self.entries.items(), key=lambda e: e[1][2:]):
            if start != end:
                raise WeightFileError(
                    f"{path}: data of {name!r} starts at {start}, not where the previous "
                    f"array ends ({end}): overlapping or misplaced offsets"
                )
            end = stop
        if end != data_size:
            raise WeightFileError(
                f"{path}: {data_size - end} bytes after the last array (the arrays must fill "
                "the data buffer exactly)"
            )

    def header(self, name):
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def read_into(self, name, target: np.ndarray) -> None:
        dtype, _, start, _ = self.entries[name]
        self.f.seek(self.data_start + start)
        _read_into(target, self.f, dtype, self.path, name)

    def close(self):
        self.f.close()


# Everything that reading a damaged zip or .npy member can raise (NotImplementedError: a zip
# compression method or version that Python does not support; RuntimeError: an encrypted
# member, which needs a password).
_NPZ_ERRORS = (
    OSError,
    EOFError,
    KeyError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


class _NpzFile:
    """A .npz file whose members' .npy headers have been read and checked; arrays are read on
    demand. Nothing is decompressed beyond the headers until the caller has compared them with
    the module the metadata describes, so a small file cannot make load() allocate more than
    that module's parameters (zip bombs), and object arrays (pickles) are refused unread.
    Duplicate member names (a zip may hold two, of which readers take different ones) are
    refused."""

    def __init__(self, f, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(f)
        except _NPZ_ERRORS as exc:
            f.close()
            raise WeightFileError(f"{path}: not a readable .npz weight file ({exc})") from exc
        try:
            # array name -> (zip member, dtype, shape, fortran order)
            self.entries: dict[str, tuple] = {}
            for info in self.zip.infolist():
                if not info.filename.endswith(".npy"):
                    raise WeightFileError(f"{path}: unexpected member {info.filename!r}")
                name = info.filename[:-4]
                if name in self.entries:
                    raise WeightFileError(f"{path}: member {info.filename!r} appears twice")
                dtype, shape, fortran = self._read_npy_header(info)
                if dtype.hasobject:
                    raise WeightFileError(
                        f"{path}: refused: {name!r} holds Python objects (a "
                        "pickle); fastff never unpickles"
                    )
                self.entries[name] = (info, dtype, shape, fortran)
            self.meta_text = self._read_meta()
        except BaseException:
            self.close()
            raise

    def _open_npy(self, info):
        """(open member stream positioned at the data, dtype, shape, fortran order)."""
        f = self.zip.open(info)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise WeightFileError(
                    f"{self.path}: {info.filename!r} has unsupported .npy version {version}"
                )
        except BaseException:
            f.close()
            raise
        return f, np.dtype(dtype), tuple(shape), bool(fortran)

    def _read_npy_header(self, info):
        try:
            f, dtype, shape, fortran = self._open_npy(info)
            f.close()
        except WeightFileError:
            raise
        except _NPZ_ERRORS as exc:
            raise WeightFileError(
                f"{self.path}: {info.filename!r} is not a readable .npy array ({exc})"
            ) from exc
        return dtype, shape, fortran

    def _read_meta(self):
        if META_KEY not in self.entries:
            return None
        _, dtype, shape, _ = self.entries[META_KEY]
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > MAX_META:
            raise WeightFileError(
                f"{self.path}: corrupt fastff metadata (or over {MAX_META} bytes)"
            )
        raw = np.empty(shape, np.uint8)
        self.read_into(META_KEY, raw)
        del self.entries[META_KEY]
        return raw.tobytes().decode("utf-8", errors="replace")

    def header(self, name):
        _, dtype, shape, _ = self.entries[name]
        return dtype, shape

    def read_into(self, name, target: np.ndarray) -> None:
        info, dtype, _, fortran = self.entries[name]
        try:
            f, _, _, _ = self._open_npy(info)
            with f:  # a Fortran-order array is stored as its transpose in C order
                _read_into(target.T if fortran else target, f, dtype, self.path, name)
        except WeightFileError:
            raise
        except _NPZ_ERRORS as exc:
            raise WeightFileError(f"{self.path}: {info.filename!r} is damaged ({exc})") from exc

    def close(self):
        fp = self.zip.fp
        self.zip.close()
        if fp is not None:
            fp.close()


def _check_module_tree(path: str, config) -> None:
    """Refuse metadata describing more than MAX_MODULES modules or Sequentials nested deeper
    than MAX_NESTING, before any is built (a 233 KB file held 3,000,000 ReLUs)."""
    count, stack = 1, [(config, 1)]
    while stack:
        node, depth = stack.pop()
        modules = node.get("modules") if isinstance(node, dict) else None
        if not isinstance(modules, list):
            continue
        count += len(modules)
        if count > MAX_MODULES:
            raise WeightFileError(f"{path}: describes more than {MAX_MODULES} modules; refused")
        if depth >= MAX_NESTING and modules:
            raise WeightFileError(f"{path}: modules nested more than {MAX_NESTING} deep; refused")
        for m in modules:
            if isinstance(m, dict):
                stack.append((m.get("config"), depth + 1))


def _rebuild(path: str, meta_text):
    """The module described by a file's metadata (JSON), not yet loaded with its arrays."""
    from . import nn  # noqa: F401 - its kinds (Sequential, Linear, ...) register on import
    from .module import build_module

    if meta_text is None:
        raise WeightFileError(
            f"{path}: no fastff metadata; load foreign state dicts with layer.load_state_dict()"
        )
    if len(meta_text) > MAX_META:
        raise WeightFileError(f"{path}: fastff metadata over {MAX_META} bytes; refused")
    meta = _parse_json(meta_text, path, "fastff metadata")
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
    _check_module_tree(path, config)
    try:
        return build_module(kind, config), meta.get("estimator")
    except (TypeError, ValueError, KeyError, MemoryError, RecursionError) as exc:
        raise WeightFileError(f"{path}: cannot rebuild {kind} from its config: {exc}") from exc


def _rebuild_estimator(path: str, module, estimator):
    """The fastff.sklearn estimator a file describes around its network `module`."""
    try:
        from .sklearn import estimator_from_saved
    except ImportError as exc:
        raise ImportError(
            f"{path} holds a fastff.sklearn estimator; loading it needs scikit-learn "
            '(pip install "fastff[sklearn]")'
        ) from exc
    try:
        return estimator_from_saved(estimator, module)
    except (TypeError, ValueError, KeyError) as exc:
        raise WeightFileError(f"{path}: cannot rebuild its estimator: {exc}") from exc


def load(path, *, format=None):
    """Rebuild the module (or fastff.sklearn estimator) stored at `path` by save().

    Raises WeightFileError (a ValueError) for truncated, foreign or inconsistent files and for
    anything that is not a regular file (FIFOs, devices), FileNotFoundError for missing ones,
    IsADirectoryError for directories and MemoryError when the declared arrays exceed the
    memory available. The stored names, dtypes and shapes are compared with the module the
    metadata describes before any array is read; each array is then read straight into its
    parameter."""
    from .module import uninitialised_parameters

    path = _check_path(path, writing=False)
    fmt = _kind_of(path, format)
    f, size = _open_regular(path)
    try:
        contents = _SafetensorsFile(f, path, size) if fmt == "safetensors" else _NpzFile(f, path)
    except BaseException:
        f.close()
        raise
    try:
        stored = sum(
            math.prod(shape) * dtype.itemsize
            for dtype, shape in map(contents.header, contents.entries)
        )
        available = available_memory_bytes()
        if stored > available:
            raise MemoryError(
                f"{path} declares {stored:,} bytes of arrays, more than the {available:,} bytes "
                "of memory available"
            )
        with (
            allocation_budget(stored + BUDGET_SLACK, f"the {stored:,} bytes of arrays in {path}"),
            uninitialised_parameters(),
        ):
            module, estimator = _rebuild(path, contents.meta_text)
        kind = type(module).__name__
        targets = {name: p for name, p, _ in module._iter_params_only()}
        missing = sorted(set(targets) - set(contents.entries))
        unexpected = sorted(set(contents.entries) - set(targets))
        if missing or unexpected:
            raise WeightFileError(
                f"{path}: does not match the {kind} it describes: missing "
                f"arrays {missing}, unexpected arrays {unexpected}"
            )
        for name, target in targets.items():
            dtype, shape = contents.header(name)
            if dtype != target.dtype:
                raise WeightFileError(
                    f"{path}: {name!r} is {dtype}, the {kind} stores {target.dtype}"
                )
            if shape != target.shape:
                raise WeightFileError(
                    f"{path}: {name!r} has shape {shape}, the {kind} expects {target.shape}"
                )
        for name, target in targets.items():
            contents.read_into(name, target)
    finally:
        contents.close()
    module.mark_updated()
    if estimator is not None:
        return _rebuild_estimator(path, module, estimator)
    return module
