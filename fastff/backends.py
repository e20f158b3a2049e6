"""Device names to backends: the one module that knows both CPUOps and GPUOps.

Layers, nn and optim ask here for an Ops; fastff.ops (the declared Ops and the CPU backend) and
fastff.gpu (the CUDA backend) never import this module or each other's modules, so the
package's import graph has no cycle (tests/test_ops.py walks it).
"""

from __future__ import annotations

from .cpu.ops import CPUOps
from .ops import Ops

_CPU = CPUOps()


def get_ops(device: str) -> Ops:
    """The Ops of a device name: "cpu", or "cuda" (needs CuPy and a CUDA device)."""
    if device == "cpu":
        return _CPU
    if device == "cuda":
        from .gpu import get_gpu_ops

        return get_gpu_ops()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def ops_of(a) -> Ops:
    """The Ops of the device an array lives on."""
    return get_ops("cuda" if hasattr(a, "__cuda_array_interface__") else "cpu")
