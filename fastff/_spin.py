"""How long idle OpenMP and OpenBLAS workers spin: set before those libraries load.

After a parallel region libgomp's workers spin (300,000 rounds by default) before they sleep,
and after a GEMM OpenBLAS's workers spin for 2**28 cycles (about 0.1 s). In a pipeline that
alternates NumPy GEMMs with fastff's OpenMP kernels, each pool's spinning threads hold the cores
the other pool needs, and on a machine whose cores are shared (another process, a VM's vCPUs) a
spinning thread delays the very thread it waits for. Measured on the project's 2-core VM: a
depth-0 UltraFFF call on 256 rows took 14 ms with libgomp's default spin and 0.4 ms with a
short one; in an MLP training step (pipe-mlp, 2 threads) the UltraFFF forward took 13.0 ms
right after the GEMMs of a Linear layer with OpenBLAS's default spin, 6.3 ms with a 2**16-cycle
one (5.8 ms alone), its backward 28.9 against 14.9 ms, the AdamW step 12.8 against 7.8 ms.

Both libraries read their setting once, when they are loaded, from the environment. fastff sets
short spins (GOMP_SPINCOUNT, OPENBLAS_THREAD_TIMEOUT) unless the user set them, or a wait
policy, and only for a library not loaded yet: importing fastff before NumPy covers OpenBLAS
too; otherwise export OPENBLAS_THREAD_TIMEOUT=16 yourself (README, "Inside a pipeline"). This
module imports nothing heavy, so fastff/__init__ can run it before NumPy loads.
"""

from __future__ import annotations

import os

GOMP_SPINCOUNT = "10000"  # spin rounds of an idle libgomp worker before it sleeps
OPENBLAS_THREAD_TIMEOUT = "16"  # an idle OpenBLAS worker spins 2**16 cycles (~25 us)


def _mapped_libraries() -> str | None:
    """This process's memory map (the shared libraries loaded); None where it cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            return f.read()
    except OSError:  # not Linux
        return None


def _gomp_loaded(maps: str) -> bool:
    """Whether the libgomp fastff links (soname libgomp.so.1) is mapped already. Wheels that
    bundle their own copy under another name (scikit-learn's libgomp-<hash>.so) do not count:
    fastff's copy still reads the environment when it loads."""
    return any(
        os.path.basename(line.split()[-1]).startswith("libgomp.so")
        for line in maps.splitlines()
        if "libgomp" in line
    )


def configure() -> dict[str, str]:
    """Set the short spins where the user chose nothing; returns what was set."""
    maps = _mapped_libraries()
    if maps is None:  # cannot tell what is loaded: change nothing
        return {}
    chosen = {}
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ) and not _gomp_loaded(maps):
        chosen["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ and "openblas" not in maps:
        chosen["OPENBLAS_THREAD_TIMEOUT"] = OPENBLAS_THREAD_TIMEOUT
    os.environ.update(chosen)
    return chosen
