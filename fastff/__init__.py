"""fastff: fast feedforward (FFF) layers for NumPy, with log-time CMM kernels."""

__version__ = "0.1.0"

try:
    from . import _cmm
except ImportError as exc:  # a source checkout without its compiled kernels
    raise ImportError(
        "fastff's compiled extension fastff._cmm is missing. From a source checkout build it with "
        "`python -m pip install -e .`; otherwise reinstall fastff."
    ) from exc

from . import interop, reference
from .io import WeightFileError, load, save
from .layers import FFF, UltraFFF
from .module import Module

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
    """Threads the CPU kernels use (OMP_NUM_THREADS by default)."""
    return _cmm.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the thread count of the CPU kernels: 1 <= n <= 8 per CPU (at least 64 allowed)."""
    from ._validation import check_int, max_threads

    _cmm.set_num_threads(check_int(n, "n", 1, max_threads()))


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
    "__version__",
]
