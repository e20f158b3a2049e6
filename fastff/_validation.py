"""Argument and array checks shared by every public entry point.

Errors are raised before anything is allocated or stored, and their messages name the argument
and what was expected.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_int(value, name: str, minimum: int | None = None) -> int:
    """An integer argument (bool refused), optionally >= minimum."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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


def check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be numpy.float32 or numpy.float64, got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be numpy.float32 or numpy.float64, got {dt}")
    return dt


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check rather than a wrong one
        return 1 << 62


def check_fits_in_memory(n_bytes: int, what: str) -> None:
    """Refuse, before allocating, an array set larger than the machine's physical memory."""
    limit = physical_memory_bytes()
    if n_bytes > limit:
        raise MemoryError(
            f"{what} needs {n_bytes:,} bytes ({n_bytes / 2**30:,.1f} GiB), more than this "
            f"machine's {limit:,} bytes of memory"
        )


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


def as_device_array(x, xp, name: str, expected: str):
    """x as an array of `xp` (NumPy for a "cpu" layer, CuPy for a "cuda" one), without a copy
    where the layout allows, refusing arrays that live on the other device.

    Besides anything np.asarray takes, host DLPack producers (CPU torch tensors, JAX arrays)
    are viewed through np.from_dlpack; on "cuda", objects with __cuda_array_interface__ or a
    CUDA DLPack device are taken by CuPy. `expected` completes the message of a ValueError
    for input that is no array at all ("x must be {expected}: ...").
    """
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
        raise ValueError(f"{name} must be {expected}: {exc}") from exc


def as_rows(x, width: int, dtype: np.dtype, xp=np, name: str = "x"):
    """View x of shape (..., width) as a C-contiguous (rows, width) array of `dtype`.

    Returns (rows, leading_shape). x may be anything np.asarray takes or a DLPack producer on
    the layer's device (see as_device_array); a C-contiguous input of `dtype` is not copied.
    Float and integer inputs are cast to `dtype`; bool, complex, object and string inputs are
    refused.
    """
    arr = as_device_array(x, xp, name, f"an array of shape (..., {width})")
    if arr.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must hold real numbers (float or integer) of shape (..., {width}), "
            f"got dtype {arr.dtype}"
        )
    if arr.ndim == 0:
        raise ValueError(f"{name} must have shape (..., {width}), got a 0-d scalar")
    if arr.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}), got shape {tuple(arr.shape)}")
    lead = tuple(arr.shape[:-1])
    rows = xp.ascontiguousarray(arr.reshape(-1, width), dtype=dtype)
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
    if arr.dtype not in FLOAT_DTYPES:
        arr = arr.astype(np.float64)
    return arr
