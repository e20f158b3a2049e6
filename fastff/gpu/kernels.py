"""The CUDA kernels of kernels.cu, compiled once per process (lazily) by cupy.RawModule.

fastff.gpu.cmm launches every kernel through `get`. This module imports without CuPy, so the
classes can be inspected (tests/test_ops.py) on machines without a GPU.
"""

from __future__ import annotations

import os

try:
    import cupy as cp
except ImportError:  # the GPU backend is then unavailable; fastff.gpu.get_gpu_ops says so
    cp = None

_SOURCE = os.path.join(os.path.dirname(__file__), "kernels.cu")
_ACTIVATIONS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "activations.h")
# templated on the element type
TYPED = (
    "ultra_forward",
    "ultra_backward_rows",
    "ultra_sorted_visits",
    "ultra_grad_chunks",
    "ultra_grad_reduce",
    "fff_hard_forward",
    "fff_hard_backward",
    "fff_soft_mixture",
    "fff_soft_router_backward",
    "fff_soft_leaf_activate",
    "fff_soft_leaf_backward",
)
# float32 register paths, templated on K float4s per lane (exact, to spare registers): widths
# up to 32 * 4 * 8 = 1024
F4 = ("ultra_forward_f4", "ultra_backward_rows_f4")
F4_KS = tuple(range(1, 9))
CTYPE = {"float32": "float", "float64": "double"}
# half-precision (16-bit) weights, templated on the storage kind (HALF_BF16 = 1, HALF_F16 = 2:
# fastff._cmm.HALF_KINDS); the register path on K 16-byte chunks of 8 weights per lane as well
HALF = ("ultra_forward_half", "fff_infer_half")
HALF_KIND_CODES = (1, 2)
H8_KS = tuple(range(1, 5))  # widths up to 32 * 8 * 4 = 1024

_module = None
_cache: dict = {}


def source() -> str:
    """kernels.cu with activations.h inlined (NVRTC then needs no include path)."""
    with open(_SOURCE) as f:
        code = f.read()
    with open(_ACTIVATIONS) as f:
        return code.replace('#include "activations.h"', f.read(), 1)


def name_expressions() -> list[str]:
    """Every kernel instantiation the launchers use, as RawModule name expressions."""
    names = [f"{k}<{t}>" for k in TYPED for t in CTYPE.values()]
    names += [f"{k}<{n}>" for k in F4 for n in F4_KS]
    names += [f"{k}<{c}>" for k in HALF for c in HALF_KIND_CODES]
    names += [f"ultra_forward_h8<{n}, {c}>" for n in H8_KS for c in HALF_KIND_CODES]
    return names + ["ultra_chunk_table"]


def _compile():
    global _module
    if _module is None:
        _module = cp.RawModule(
            code=source(), options=("-std=c++17",), name_expressions=name_expressions()
        )
    return _module


def get(name, dtype=None, k=None, half_kind=None):
    """The kernel `name`: name<K> for the float4 paths, name<T> for a dtype, name<KIND> or
    name<K, KIND> for 16-bit weights (half_kind), else untemplated."""
    key = (name, dtype, k, half_kind)  # the dtype itself: its .name costs microseconds per call
    kernel = _cache.get(key)
    if kernel is None:
        dtype_name = None if dtype is None else cp.dtype(dtype).name
        if half_kind is not None:
            full = f"{name}<{half_kind}>" if k is None else f"{name}<{k}, {half_kind}>"
        elif k is not None:
            full = f"{name}<{k}>"
        elif dtype_name is not None:
            full = f"{name}<{CTYPE[dtype_name]}>"
        else:
            full = name
        kernel = _cache[key] = _compile().get_function(full)
    return kernel
