"""fastff: fast feedforward (FFF) layers for NumPy, with log-time CMM kernels."""

# ruff: noqa: E402 (the spin settings must be made before NumPy and the kernels load)
from . import _spin

# libgomp and OpenBLAS read how long idle workers spin once, when loaded (fastff/_spin.py)
_spin.configure()

from . import _threads
from ._version import __version__

try:
    from . import _cmm  # noqa: F401
except ImportError as exc:  # a source checkout without its compiled kernels
    raise ImportError(
        "fastff's compiled extension fastff._cmm is missing. From a source checkout build it with "
        "`python -m pip install -e .`; otherwise reinstall fastff."
    ) from exc

from . import interop, reference
from ._threads import num_threads, set_num_threads
from .io import WeightFileError, load, save
from .layers import FFF, UltraFFF
from .module import Module

_threads.register_threadpoolctl()

# fastff.nn, fastff.optim and fastff.data are imported on first use (`fastff.nn.Linear` after a
# plain `import fastff`), so `import fastff` does not pay for them.
_LAZY_SUBMODULES = ("nn", "optim", "data")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def get_num_threads() -> int:
    """Threads the CPU kernels called now from this thread may use (before each kernel lowers
    it for small work): ``num_threads`` scope, else ``set_num_threads`` or a threadpoolctl
    limit, else OMP_NUM_THREADS, else the CPUs available to the process."""
    return _threads.effective_n_threads()


__all__ = [
    "FFF",
    "UltraFFF",
    "Module",
    "reference",
    "interop",
    "nn",
    "optim",
    "data",
    "save",
    "load",
    "WeightFileError",
    "get_num_threads",
    "set_num_threads",
    "num_threads",
    "__version__",
]
