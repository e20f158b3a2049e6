"""GPUOps: the CUDA backend, twin of fastff.cpu.ops.CPUOps (CuPy arrays; the kernels of
kernels.cu launched by fastff.gpu.cmm, which mirrors fastff._cmm's signatures)."""

from __future__ import annotations

from ..ops import Ops
from . import cmm
from .kernels import cp


class GPUOps(Ops):
    """Every op as declared on Ops; the kernels compile once per process, on first CUDA use."""

    name = "cuda"
    xp = cp
    cmm = cmm
    _instance = None

    @classmethod
    def instance(cls) -> GPUOps:
        """The one GPUOps; RuntimeError naming what is missing without CuPy or a GPU."""
        if cls._instance is None:
            if cp is None:
                raise RuntimeError(
                    "device 'cuda' needs CuPy and a CUDA GPU: `pip install fastff[gpu]` (or the "
                    "cupy-cudaXXx wheel of your CUDA version)"
                )
            try:
                n_devices = cp.cuda.runtime.getDeviceCount()
            except cp.cuda.runtime.CUDARuntimeError as exc:
                raise RuntimeError(f"device 'cuda' needs a CUDA GPU: {exc}") from exc
            if n_devices == 0:
                raise RuntimeError("device 'cuda' needs a CUDA GPU; none was found")
            cls._instance = cls()
        return cls._instance

    def asarray(self, a, dtype=None):
        return cp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return cp.asnumpy(a)

    def _csr_rows(self, values, columns, n_columns):
        import cupyx.scipy.sparse

        n_rows, per_row = values.shape
        indptr = cp.arange(0, n_rows * per_row + 1, per_row, dtype=cp.int32)
        return cupyx.scipy.sparse.csr_matrix(
            (values.reshape(-1), columns.reshape(-1).astype(cp.int32), indptr),
            shape=(n_rows, n_columns),
        )
