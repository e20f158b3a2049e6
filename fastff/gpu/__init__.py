"""CUDA backend (CuPy). Importing fastff never needs it; asking for "cuda" does."""


def get_gpu_ops():
    """The GPUOps instance; RuntimeError naming what is missing without CuPy or a GPU."""
    from .ops import GPUOps

    return GPUOps.instance()
