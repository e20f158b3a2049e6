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


def get_num_threads() -> int:
    """Threads the CPU kernels use (OMP_NUM_THREADS by default)."""
    return _cmm.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the thread count of the CPU kernels."""
    from ._validation import check_int

    _cmm.set_num_threads(check_int(n, "n", 1))


__all__ = [
    "FFF",
    "UltraFFF",
    "Module",
    "reference",
    "interop",
    "save",
    "load",
    "WeightFileError",
    "get_num_threads",
    "set_num_threads",
    "__version__",
]
