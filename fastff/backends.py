"""Device names to backends: a small registry, the one module that knows both CPUOps and GPUOps.

Layers, nn and optim ask here for an Ops; fastff.ops (the declared Ops), fastff.cpu and
fastff.gpu never import this module or each other's modules, so the package's import graph has
no cycle (tests/test_ops.py walks it). A backend registers a factory under its device name; the
factory is called on the first request for that device (so CuPy is imported only then) and
its Ops is kept.
"""

from __future__ import annotations

from typing import Callable

from .ops import Ops

_FACTORIES: dict[str, Callable[[], Ops]] = {}
_MADE: dict[str, Ops] = {}


def register_backend(device: str, factory: Callable[[], Ops]) -> None:
    """Make get_ops(device) return factory()'s Ops (made on first use, then kept)."""
    _FACTORIES[device] = factory
    _MADE.pop(device, None)


def get_ops(device: str) -> Ops:
    """The Ops of a device name: "cpu", or "cuda" (needs CuPy and a CUDA device)."""
    ops = _MADE.get(device)
    if ops is None:
        factory = _FACTORIES.get(device)
        if factory is None:
            names = " or ".join(repr(d) for d in _FACTORIES)
            raise ValueError(f"device must be {names}, got {device!r}")
        ops = _MADE[device] = factory()
    return ops


def ops_of(a) -> Ops:
    """The Ops of the device an array lives on."""
    return get_ops("cuda" if hasattr(a, "__cuda_array_interface__") else "cpu")


def _cpu() -> Ops:
    from .cpu.ops import CPUOps

    return CPUOps()


def _cuda() -> Ops:  # RuntimeError naming what is missing without CuPy or a GPU
    from .gpu import get_gpu_ops

    return get_gpu_ops()


register_backend("cpu", _cpu)
register_backend("cuda", _cuda)
