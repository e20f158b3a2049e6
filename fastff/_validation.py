"""Argument and array checks shared by every public entry point.

Errors are raised before anything is allocated or stored, and their messages name the argument
and what was expected.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
import os
from collections.abc import Callable

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
try:  # bfloat16 as a NumPy dtype (the one JAX uses); importing it registers the name
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - a dependency; half precision then means float16 only
    BFLOAT16 = None
# Half-precision storage: weights kept in 16 bits, widened to float32 by the kernels.
HALF_DTYPES = tuple(d for d in (BFLOAT16, np.dtype(np.float16)) if d is not None)

# The CPU kernels index within a row with C ints: a width beyond this would wrap around.
MAX_WIDTH = 2**31 - 1
# 2**(depth + 1) is computed exactly before the memory check; past this the Python integer
# itself would be enormous (depth=2**63 would try to build a 2**63-bit number).
MAX_DEPTH = 64


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer argument (bool refused), optionally >= minimum and <= maximum."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def max_threads() -> int:
    """The largest kernel thread count accepted: 8 per CPU, at least 64. More only
    oversubscribes, and OpenMP kills the process (no Python error) once the system refuses to
    create the threads (set_num_threads(100000) crashed)."""
    return max(64, 8 * (os.cpu_count() or 1))


def output_file_problem(path, flag: str) -> str | None:
    """Why a command-line output file (--json, --plot) could not be written, found before
    any work rather than after it; None if it looks writable. A directory, a device such as
    /dev/full, an unwritable file or a folder that cannot be created are problems."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file name"
    if os.path.exists(path):
        if not os.path.isfile(path):
            return f"{flag} {path} is not a regular file"
        if not os.access(path, os.W_OK):
            return f"{flag} {path} is not writable"
        return None
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the folders save would create
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot create files in {parent}"
    return None


def check_width(value, name: str) -> int:
    """A layer width: an integer in [1, MAX_WIDTH]."""
    return check_int(value, name, 1, MAX_WIDTH)


def check_depth(value, what: str) -> int:
    """A tree depth >= 0. Depths beyond MAX_DEPTH cannot fit in any memory: they raise
    MemoryError like any other too-large layer, without computing 2**depth."""
    depth = check_int(value, "depth", 0)
    if depth > MAX_DEPTH:
        raise MemoryError(
            f"{what} with depth={depth} has at least 2**{depth} nodes of 4 or more "
            f"bytes: it needs more than 2**{depth + 2} bytes, more than any "
            "machine's memory"
        )
    return depth


def check_probability(value, name: str, *, allow_one: bool = False) -> float:
    """A float in [0, 1) (or [0, 1] with allow_one)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value >= 0.0 and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_nonnegative(value, name: str) -> float:
    """A finite real number >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_float_dtype(dtype, name: str = "dtype", *, half: bool = False) -> np.dtype:
    """The np.dtype of a layer's dtype argument: float32 or float64, and with `half` also the
    half-precision storage types bfloat16 (ml_dtypes; "bfloat16" works as a name) and
    float16. Anything else, an unknown name or a dtype of another kind (int32, float128), is a
    TypeError naming the supported ones."""
    allowed = (
        "numpy.float32, numpy.float64, 'bfloat16' or numpy.float16"
        if half
        else "numpy.float32 or numpy.float64"
    )
    if dtype is None:  # numpy reads None as float64; a layer's default is float32: be explicit
        raise TypeError(f"{name} must be {allowed}, got None")
    if isinstance(dtype, str) and dtype == "bfloat16" and BFLOAT16 is None:
        raise TypeError(f"{name} 'bfloat16' needs the ml_dtypes package: pip install ml_dtypes")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be {allowed}, got {dtype!r}") from exc
    if dt in FLOAT_DTYPES or (half and dt in HALF_DTYPES):
        return dt
    raise TypeError(f"{name} must be {allowed}, got {dt}")


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a layer stored in `dtype` computes in: float32 for half-precision storage."""
    return np.dtype(np.float32) if dtype in HALF_DTYPES else dtype


CGROUP_LIMIT_FILES = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)  # cgroup v1


def _cgroup_limit_bytes():
    """The memory limit of this process's container, or None. Inside a container the machine's
    physical memory overstates what can be allocated: past the cgroup limit the kernel kills the
    process instead of failing the allocation."""
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None  # no file, or "max": no limit


@functools.cache
def physical_memory_bytes() -> int:
    """The memory this process may use: physical memory, or the container's limit if lower.
    Read once (forward passes check against it)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check rather than a wrong one
        physical = 1 << 62
    limit = _cgroup_limit_bytes()
    return physical if limit is None else min(physical, limit)


def available_memory_bytes() -> int:
    """Memory that can be allocated now (not cached: it changes): the kernel's MemAvailable,
    or within a container the cgroup limit less its current usage if that is lower; at most
    physical_memory_bytes(). fastff.load checks a file's declared bytes against this."""
    available = physical_memory_bytes()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = min(available, int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_limit_bytes()
    if limit is not None:
        for path in (
            "/sys/fs/cgroup/memory.current",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ):
            try:
                with open(path) as f:
                    available = min(available, max(0, limit - int(f.read().strip())))
                break
            except (OSError, ValueError):
                continue
    return available


def check_fits_in_memory(n_bytes: int, what: str | Callable[[], str]) -> None:
    """Refuse, before allocating, an array set larger than the memory this process may use,
    or than what is left of an allocation_budget in force. `what` names the arrays, or is a
    function that does (per-call paths: the text is only formatted for an error)."""
    limit = physical_memory_bytes()
    if n_bytes > limit:
        raise MemoryError(
            f"{_text(what)} needs {n_bytes:,} bytes ({n_bytes / 2**30:,.1f} GiB), more than "
            f"this machine's {limit:,} bytes of memory"
        )
    budget = _ALLOCATION_BUDGET.get()
    if budget is not None:
        if n_bytes > budget["left"]:
            raise MemoryError(
                f"{_text(what)} needs {n_bytes:,} bytes, more than the {budget['left']:,} "
                f"bytes left of {budget['why']}"
            )
        budget["left"] -= n_bytes


def _text(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


# In force while fastff.load rebuilds a module from a file's metadata: the parameters may not
# exceed the bytes of arrays the file holds (a few bytes of JSON must not be able to make load
# allocate gigabytes). A context variable, so other threads are unaffected.
_ALLOCATION_BUDGET: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "fastff_allocation_budget", default=None
)


@contextlib.contextmanager
def allocation_budget(n_bytes: int, why: str):
    """Within the block, the checked allocations (parameters) may add up to n_bytes at most."""
    token = _ALLOCATION_BUDGET.set({"left": n_bytes, "why": why})
    try:
        yield
    finally:
        _ALLOCATION_BUDGET.reset(token)


def is_cuda_array(x) -> bool:
    return hasattr(x, "__cuda_array_interface__")


# DLPack device types (dlpack.h, DLDeviceType), named in error messages.
DLPACK_CPU = 1
DLPACK_CUDA_TYPES = (2, 13)  # kDLCUDA, kDLCUDAManaged: CuPy can take these without a copy
DLPACK_DEVICE_NAMES = {
    1: "CPU",
    2: "CUDA",
    3: "CUDA pinned host",
    4: "OpenCL",
    7: "Vulkan",
    8: "Metal",
    9: "VPI",
    10: "ROCm",
    11: "ROCm pinned host",
    13: "CUDA managed",
    14: "oneAPI",
    15: "WebGPU",
    16: "Hexagon",
}


def dlpack_device_type(x):
    """The DLPack device type (an int) of a DLPack producer that is not a NumPy array, e.g. a
    torch tensor or a JAX array; None for anything else."""
    if isinstance(x, np.ndarray) or not (
        hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")
    ):
        return None
    try:
        return int(x.__dlpack_device__()[0])
    except Exception:  # a broken or exotic producer: leave it to np.asarray
        return None


def refuse_masked(x, name: str) -> None:
    """np.asarray drops a masked array's mask, so the hidden values would be used silently."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array; fill or drop the masked values first "
            f"({name}.filled(value) or {name}.compressed())"
        )


def check_cast_in_range(
    src, converted, dtype, xp, name: str, remedy: str = "scale the input or use a float64 layer"
) -> None:
    """After a narrowing float cast (float64 -> float32, float32 -> float16): refuse finite
    values that became infinite, rather than hand back inf or NaN outputs for finite inputs.
    One extra pass over the array, paid only on the narrowing path. `remedy` ends the
    message."""
    if bool(xp.isfinite(converted).all()):
        return
    overflow = xp.isfinite(src) & ~xp.isfinite(converted)
    if bool(overflow.any()):
        example = src[overflow].reshape(-1)[0]
        raise ValueError(
            f"{name} has values beyond the range of {dtype} (e.g. {float(example)!r}); {remedy}"
        )


def as_device_array(x, xp, name: str, expected: str | Callable[[], str]):
    """x as an array of `xp` (NumPy for a "cpu" layer, CuPy for a "cuda" one), without a copy
    where the layout allows, refusing arrays that live on the other device.

    Besides anything np.asarray takes, host DLPack producers (CPU torch tensors, JAX arrays)
    are viewed through np.from_dlpack; on "cuda", objects with __cuda_array_interface__ or a
    CUDA DLPack device are taken by CuPy. `expected` completes the message of a ValueError
    for input that is no array at all ("x must be {expected}: ..."), or is a function that
    gives it (hot paths: the text is only formatted for an error).
    """
    if type(x) is xp.ndarray:  # the common case (NumPy on "cpu", CuPy on "cuda"): hot path
        return x
    refuse_masked(x, name)
    dl_device = dlpack_device_type(x)
    on_cuda = is_cuda_array(x) or dl_device in DLPACK_CUDA_TYPES
    if xp is np and (on_cuda or dl_device not in (None, DLPACK_CPU)):
        where = (
            "a CUDA array"
            if is_cuda_array(x)
            else f"an array on a {DLPACK_DEVICE_NAMES.get(dl_device, 'non-CPU')} device "
            f"(DLPack device type {dl_device})"
        )
        raise TypeError(
            f"{name} is {where} but the layer is on 'cpu': move the layer with .to('cuda') "
            f"or copy {name} to the host first (e.g. tensor.cpu())"
        )
    if xp is not np and not on_cuda:
        raise TypeError(
            f"{name} is a host array ({type(x).__name__}) but the layer is on 'cuda': pass a "
            f"CuPy array (cupy.asarray({name})) or move the layer with .to('cpu')"
        )
    try:
        if dl_device == DLPACK_CPU:
            try:
                return np.from_dlpack(x)
            except (BufferError, TypeError, ValueError, RuntimeError):
                pass  # e.g. a dtype DLPack cannot describe: np.asarray may still convert it
        elif xp is not np and not is_cuda_array(x):
            return xp.from_dlpack(x)
        return xp.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be {_text(expected)}: {exc}") from exc


def as_rows(x, width: int, dtype: np.dtype, xp=np, name: str = "x"):
    """View x of shape (..., width) as a C-contiguous (rows, width) array of `dtype`.

    Returns (rows, leading_shape). x may be anything np.asarray takes or a DLPack producer on
    the layer's device (see as_device_array); a C-contiguous input of `dtype` is not copied.
    Float and integer inputs are cast to `dtype`; bool, complex, object and string inputs are
    refused.
    """
    arr = as_device_array(x, xp, name, lambda: f"an array of shape (..., {width})")
    if arr.dtype.kind not in "fiu" and arr.dtype not in HALF_DTYPES:
        raise TypeError(
            f"{name} must hold real numbers (float or integer) of shape (..., {width}), "
            f"got dtype {arr.dtype}"
        )
    if arr.ndim == 0:
        raise ValueError(f"{name} must have shape (..., {width}), got a 0-d scalar")
    if arr.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}), got shape {tuple(arr.shape)}")
    if arr.ndim == 2:
        lead, flat = (arr.shape[0],), arr
    else:
        lead = tuple(arr.shape[:-1])
        flat = arr.reshape(-1, width)
    if flat.dtype == dtype:
        return xp.ascontiguousarray(flat), lead
    with np.errstate(over="ignore"):  # an overflowing cast is reported just below instead
        rows = xp.ascontiguousarray(flat, dtype=dtype)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > dtype.itemsize:
        check_cast_in_range(flat, rows, dtype, xp, name)
    return rows, lead


def as_float_array(x, xp=np, name: str = "x"):
    """x as an array of `xp` (NumPy or CuPy) of any shape with ndim >= 1, for layers without
    parameters: float32 and float64 are kept, other real dtypes are cast to float64; bool,
    complex, object and string inputs are refused. Inputs as for as_rows."""
    arr = as_device_array(x, xp, name, "a rectangular array of real numbers")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (float or integer), got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d scalar")
    return as_compute_float(arr, xp, name)


def as_compute_float(arr, xp, name: str):
    """A real array in a dtype to compute in: float32 and float64 are kept, everything else
    (integers, float16, long double) becomes float64. float16 would overflow in products
    (256**2 > 65504); a long double beyond float64's range is refused rather than made inf."""
    if arr.dtype in FLOAT_DTYPES:
        return arr
    with np.errstate(over="ignore"):
        wide, arr = arr, arr.astype(np.float64)
    if wide.dtype.kind == "f" and wide.dtype.itemsize > 8:
        check_cast_in_range(wide, arr, np.dtype(np.float64), xp, name)
    return arr
