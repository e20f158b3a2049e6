"""CUDA backend (CuPy). Importing fastff never needs it; asking for "cuda" does."""


def get_gpu_ops():
    try:
        from .ops import GPUOps
    except ImportError as exc:
        raise RuntimeError(
            "device 'cuda' needs CuPy and a CUDA GPU: `pip install fastff[gpu]` "
            f"(or the cupy-cudaXXx wheel of your CUDA version); import failed: {exc}"
        ) from exc
    return GPUOps.instance()
